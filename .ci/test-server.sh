#!/usr/bin/env bash
# The server's OpenAI-client tests: builds the `autoglm` binary, starts two servers on free loopback
# ports (the bundled tiny text model and the glm4v-tiny model; glm4v-tiny again with the `openai`
# content format), waits for /ready, runs pytest tests/server with the official `openai` package
# (from a venv at .venv), and stops the servers whatever happens.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== python venv (.venv) with openai, pytest, pillow and prometheus-client"
if [ ! -x .venv/bin/python ]; then
  if ! python3 -m venv .venv 2>/dev/null; then
    apt-get update -qq && apt-get install -y -qq python3-venv
    python3 -m venv .venv
  fi
fi
.venv/bin/python -m pip install -q openai pytest pillow prometheus-client

echo "== build the autoglm binary"
cargo build --release -p autoglm-cli

# Two servers: the text model and the Glm4v model as Open-AutoGLM's recommended vLLM command runs
# them (content format `string`), and the Glm4v model with content format `openai` (the fixture has
# cases of both). Port 0: each server picks a free port and prints it ("listening on
# http://127.0.0.1:PORT"), so no other process can take the port between choosing and binding it.
media=$(mktemp -d)
cp tests/fixtures/glm4v-tiny/exact.png "$media/exact.png"
pids=()
logs=()
stop_servers() {
  # SIGTERM is a graceful shutdown; give it 30 s, then kill.
  for server in "${pids[@]}"; do
    kill -0 "$server" 2>/dev/null && kill -TERM "$server"
  done
  for server in "${pids[@]}"; do
    for _ in $(seq 300); do
      kill -0 "$server" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$server" 2>/dev/null; then
      echo "server $server did not stop on SIGTERM within 30 s; killing it" >&2
      kill -KILL "$server"
    fi
    wait "$server" 2>/dev/null || true
  done
  rm -f "${logs[@]}"
  rm -rf "$media"
}
trap stop_servers EXIT

# start_server ARGS...: starts a server and prints its URL once /ready answers 200.
start_server() {
  local log
  log=$(mktemp)
  logs+=("$log")
  "${CARGO_TARGET_DIR:-target}"/release/autoglm serve --host 127.0.0.1 --port 0 "$@" >"$log" 2>&1 &
  pids+=($!)
  python3 - "$log" "$!" <<'PY' || { echo "--- server log" >&2; cat "$log" >&2; return 1; }
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
}

echo "== starting the servers"
# Command substitution runs in a subshell: start each server in this shell, its URL via a file.
# `--generation-config vllm`: the tests' requests leave sampling fields unset meaning the builtin
# defaults (temperature 1), not the fixtures' generation_config.json (autoglm-cli's tests cover
# `auto`).
start_server --model glm4-tiny=tests/fixtures/glm4-tiny --model glm4v-tiny=tests/fixtures/glm4v-tiny \
  --limit-mm-per-prompt '{"image": 3}' --allowed-local-media-path "$media" \
  --tool-call-parser glm45 --enable-auto-tool-choice --generation-config vllm >"$media/url1"
start_server --model glm4v-tiny=tests/fixtures/glm4v-tiny --chat-template-content-format openai \
  --generation-config vllm >"$media/url2"
url=$(cat "$media/url1")
url_openai=$(cat "$media/url2")
echo "servers at $url and $url_openai"

echo "== pytest tests/server"
AUTOGLM_SERVER_URL="$url" AUTOGLM_SERVER_URL_OPENAI="$url_openai" AUTOGLM_MEDIA_DIR="$media" \
  .venv/bin/python -m pytest -q tests/server || {
  for log in "${logs[@]}"; do echo "--- server log $log"; cat "$log"; done
  exit 1
}
echo "== server tests passed"
