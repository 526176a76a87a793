#!/usr/bin/env bash
# The server's OpenAI-client tests: builds the serve example, starts it on a free loopback port with
# the bundled tiny model, waits for /ready, runs pytest tests/server with the official `openai`
# package (from a venv at .venv), and stops the server whatever happens.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== python venv (.venv) with openai and pytest"
if [ ! -x .venv/bin/python ]; then
  if ! python3 -m venv .venv 2>/dev/null; then
    apt-get update -qq && apt-get install -y -qq python3-venv
    python3 -m venv .venv
  fi
fi
.venv/bin/python -m pip install -q openai pytest

echo "== build the serve example"
cargo build --release --example serve

# Port 0: the server picks a free port and prints it ("listening on http://127.0.0.1:PORT"), so no
# other process can take the port between choosing and binding it.
log=$(mktemp)
"${CARGO_TARGET_DIR:-target}"/release/examples/serve --host 127.0.0.1 --port 0 \
  --model glm4-tiny=tests/fixtures/glm4-tiny >"$log" 2>&1 &
server=$!
stop_server() {
  # SIGTERM is a graceful shutdown; give it 30 s, then kill.
  if kill -0 "$server" 2>/dev/null; then
    kill -TERM "$server"
    for _ in $(seq 300); do
      kill -0 "$server" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$server" 2>/dev/null; then
      echo "the server did not stop on SIGTERM within 30 s; killing it" >&2
      kill -KILL "$server"
    fi
    wait "$server" 2>/dev/null || true
  fi
  rm -f "$log"
}
trap stop_server EXIT

echo "== waiting for the server's address and /ready"
url=$(python3 - "$log" "$server" <<'PY'
import os, re, sys, time, urllib.request
log, pid = sys.argv[1], int(sys.argv[2])
deadline = time.monotonic() + 120
url = None
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit("the server exited before it was ready")
    if url is None:
        m = re.search(r"listening on (http://127\.0\.0\.1:\d+)", open(log).read())
        url = m and m.group(1)
    if url:
        try:
            with urllib.request.urlopen(f"{url}/ready", timeout=2) as r:
                if r.status == 200:
                    print(url)
                    sys.exit(0)
        except OSError:
            pass
    time.sleep(0.2)
sys.exit("the server was not ready within 120 s")
PY
) || { echo "--- server log"; cat "$log"; exit 1; }
echo "server at $url"

echo "== pytest tests/server"
AUTOGLM_SERVER_URL="$url" .venv/bin/python -m pytest -q tests/server || {
  echo "--- server log"; cat "$log"; exit 1
}
echo "== server tests passed"
