#!/usr/bin/env bash
# `make run`: the demo IM upstream and the gateway on the demo table, in the
# foreground. Ctrl-C drains the gateway and stops both.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
UPSTREAM=${UPSTREAM:-127.0.0.1:7001}
HTTP=${HTTP:-127.0.0.1:8080}
ADMIN=${ADMIN:-127.0.0.1:9180}

$BIN/tlvproxy check -c commands.yaml >/dev/null
$BIN/tlvproxy mock-upstream --listen "$UPSTREAM" -c commands.yaml &
upstream=$!
$BIN/tlvproxy serve -c commands.yaml &
gateway=$!
stop() { kill -TERM "$gateway" "$upstream" 2>/dev/null || true; wait; }
trap stop INT TERM EXIT

for _ in $(seq 1 100); do
  if $BIN/python -c "import urllib.request,sys; urllib.request.urlopen('http://$ADMIN/readyz', timeout=1)" 2>/dev/null; then
    break
  fi
  sleep 0.1
done
cat <<TXT >&2

tlvproxy demo is running (Ctrl-C stops it)
  REST       http://$HTTP/v1/...        routes: $BIN/tlvproxy check
  WebSocket  ws://$HTTP/ws?uid=1&did=laptop
  web demo   http://$HTTP/demo/
  admin      http://$ADMIN/readyz  /metrics  /admin/config  /openapi.json
  upstream   $UPSTREAM (the bundled demo IM service)

Try:
  curl -s -X POST http://$HTTP/v1/messages -H 'X-User-Id: 1' -d '{"to_uid": 2, "text": "hello"}'
  curl -s http://$HTTP/v1/users/1/profile
  curl -s -X POST http://$HTTP/v1/echo -d '{"any": ["json", 1]}'

TXT
wait "$gateway"
