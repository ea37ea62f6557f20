#!/usr/bin/env bash
# `make run`: the demo IM upstream and the gateway on the demo table, in the
# foreground. Ctrl-C drains the gateway and stops both. The upstream signs the
# demo's login tokens with the key `make demo-keys` made (a DEMO login: any
# user id gets a token, no password).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
UPSTREAM=${UPSTREAM:-127.0.0.1:7001}
HTTP=${HTTP:-127.0.0.1:8080}
ADMIN=${ADMIN:-127.0.0.1:9180}
KEY=build/demo-keys/demo-signing-key.pem

if [ ! -f "$KEY" ] || [ ! -f build/demo-keys/jwks.json ]; then
  echo "run-demo: $KEY or its jwks.json is missing: run \`make demo-keys\` (\`make run\` does)" >&2
  exit 1
fi
$BIN/tlvproxy check -c commands.yaml >/dev/null
$BIN/tlvproxy mock-upstream --listen "$UPSTREAM" --token-key "$KEY" -c commands.yaml &
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
  WebSocket  ws://$HTTP/ws?access_token=TOKEN&did=laptop
  web demo   http://$HTTP/demo/             (log in as two users in two tabs)
  admin      http://$ADMIN/readyz  /metrics  /admin/config  /openapi.json
  upstream   $UPSTREAM (the bundled demo IM service; it signs the demo tokens)

Try (login is a DEMO login: a token for any user id, no password):
  TOKEN=\$(curl -s -X POST http://$HTTP/v1/login -d '{"user_id": 1}' | $BIN/python -c 'import json,sys; print(json.load(sys.stdin)["token"])')
  curl -s -X POST http://$HTTP/v1/messages -H "Authorization: Bearer \$TOKEN" -d '{"to_uid": 2, "text": "hello"}'
  curl -s http://$HTTP/v1/me/messages -H "Authorization: Bearer \$TOKEN"
  curl -s http://$HTTP/v1/users/1/profile
  curl -s -X POST http://$HTTP/v1/echo -d '{"any": ["json", 1]}'

TXT
wait "$gateway"
