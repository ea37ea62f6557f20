#!/usr/bin/env bash
# `make run`: the demo IM upstream and the gateway on the demo table, in the
# foreground. Ctrl-C drains the gateway and stops both. The upstream signs the
# demo's login tokens with the key `make demo-keys` made (a DEMO login: any
# user id gets a token, no password).
#
# It reports the demo as running only once its own two processes answer: the
# gateway's /readyz, from the listeners of that gateway process (not another
# instance already on the port), and the upstream's port, from that upstream
# process. Otherwise it stops what it started and exits 1, saying why.
#
# TABLE, KEYS, UPSTREAM, HTTP and ADMIN name another table, key directory and
# addresses (the tests run it on free ports); the addresses must be the table's.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
TABLE=${TABLE:-commands.yaml}
KEYS=${KEYS:-build/demo-keys}
UPSTREAM=${UPSTREAM:-127.0.0.1:7001}
HTTP=${HTTP:-127.0.0.1:8080}
ADMIN=${ADMIN:-127.0.0.1:9180}
KEY=$KEYS/demo-signing-key.pem

if [ ! -f "$KEY" ] || [ ! -f "$KEYS/jwks.json" ]; then
  echo "run-demo: $KEY or its jwks.json is missing: run \`make demo-keys\` (\`make run\` does)" >&2
  exit 1
fi
$BIN/tlvproxy check -c "$TABLE" >/dev/null
upstream=""
gateway=""
stop() {
  # Only our own processes, by their pids.
  for pid in $gateway $upstream; do kill -TERM "$pid" 2>/dev/null || true; done
  wait
}
trap stop INT TERM EXIT
die() {
  echo "run-demo: $*" >&2
  exit 1
}

# Whether process $1, or one of its children (the workers of `workers: N`),
# holds the socket listening on port $2: read from /proc, so that another
# process answering on that port is never taken for ours.
listens() {
  $BIN/python - "$1" "$2" <<'PY'
import os, sys
from pathlib import Path

pid, port = int(sys.argv[1]), int(sys.argv[2])
inodes = set()
for table in ("/proc/net/tcp", "/proc/net/tcp6"):
    try:
        lines = Path(table).read_text().splitlines()[1:]
    except OSError:  # no IPv6
        continue
    for line in lines:
        fields = line.split()
        if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
            inodes.add(fields[9])
pids = {pid}
for entry in Path("/proc").iterdir():
    try:
        if entry.name.isdigit() and (entry / "stat").read_text().rsplit(")", 1)[1].split()[1] == str(pid):
            pids.add(int(entry.name))
    except OSError:
        pass
for owner in pids:
    try:
        links = [os.readlink(fd) for fd in Path(f"/proc/{owner}/fd").iterdir()]
    except OSError:
        continue
    if any(link[8:-1] in inodes for link in links if link.startswith("socket:[")):
        sys.exit(0)
sys.exit(1)
PY
}

$BIN/tlvproxy mock-upstream --listen "$UPSTREAM" --token-key "$KEY" -c "$TABLE" &
upstream=$!
for _ in $(seq 1 100); do
  kill -0 "$upstream" 2>/dev/null || die "the demo upstream exited: is $UPSTREAM in use? (see above)"
  listens "$upstream" "${UPSTREAM##*:}" && break
  sleep 0.1
done
listens "$upstream" "${UPSTREAM##*:}" || die "the demo upstream does not listen on $UPSTREAM after 10 s"

$BIN/tlvproxy serve -c "$TABLE" &
gateway=$!
ready=""
for _ in $(seq 1 100); do
  kill -0 "$gateway" 2>/dev/null || die "the gateway exited: is $HTTP or $ADMIN in use? (see its line above)"
  kill -0 "$upstream" 2>/dev/null || die "the demo upstream exited (see above)"
  if $BIN/python -c "import urllib.request,sys; urllib.request.urlopen('http://$ADMIN/readyz', timeout=1)" 2>/dev/null \
    && listens "$gateway" "${ADMIN##*:}" && listens "$gateway" "${HTTP##*:}"; then
    ready=1
    break
  fi
  sleep 0.1
done
[ -n "$ready" ] || die "the gateway did not become ready on $HTTP and $ADMIN within 10 s"
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
