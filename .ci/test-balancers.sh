#!/usr/bin/env bash
# Load balancers in front of autoglm (issue 17): deploy/haproxy/haproxy.cfg and
# deploy/nginx/nginx.conf, run as they are (rendered with three loopback replicas' addresses) by
#   tests/balancers/failover.py        SIGKILL, rolling SIGTERM restarts, an unready replica (its
#                                      model unloaded), a hung one (SIGSTOP), the backup taking over,
#                                      under streaming load from the official openai client; TLS
#                                      termination at HAProxy
#   tests/balancers/prefix_routing.py  prefix-cache hit rate of Open-AutoGLM-shaped agents with and
#                                      without session affinity (short version here)
# Builds nothing: it uses ${CARGO_TARGET_DIR:-target}/release/autoglm, which the earlier suite of
# .ci/test built. Installs haproxy, nginx and openssl if missing (without starting their system
# services), a venv at .venv with openai and pillow. Each program runs under `timeout`, in its
# own process group, killed whole if it overruns or this script is stopped. The tables go to
# $BALANCERS_OUT (default: a temp dir), and to stdout.
set -euo pipefail
cd "$(dirname "$0")/.."

bin="${CARGO_TARGET_DIR:-target}/release/autoglm"
if [ ! -x "$bin" ]; then
  echo "test-balancers: no autoglm binary at $bin; build it first (cargo build --release -p autoglm-cli)," \
    "as .ci/test does before this suite" >&2
  exit 1
fi

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
missing=()
command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
command -v nginx >/dev/null 2>&1 || missing+=(nginx)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
command -v setpriv >/dev/null 2>&1 || missing+=(util-linux)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "== apt-get install ${missing[*]}"
  # No service may start from the packages' postinst (nginx would take port 80): policy-rc.d 101.
  policy=/usr/sbin/policy-rc.d
  made_policy=""
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
    $sudo chmod 755 "$policy"
    made_policy=1
  fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
  [ -z "$made_policy" ] || $sudo rm -f "$policy"
fi
for tool in haproxy nginx openssl setpriv; do
  command -v "$tool" >/dev/null 2>&1 || { echo "test-balancers: $tool is still missing" >&2; exit 1; }
done
haproxy_build=$(haproxy -vv 2>&1 || true)
grep -q 'Built with Lua' <<<"$haproxy_build" || {
  echo "test-balancers: this haproxy has no Lua (deploy/haproxy/prefix_key.lua needs it)" >&2
  exit 1
}

echo "== python venv (.venv) with openai and pillow"
if [ ! -x .venv/bin/python ]; then
  if ! python3 -m venv .venv 2>/dev/null; then
    $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq python3-venv
    python3 -m venv .venv
  fi
fi
.venv/bin/python -m pip install -q openai pillow

out="${BALANCERS_OUT:-$(mktemp -d)}"
mkdir -p "$out"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}"

# run SECONDS CMD...: CMD under timeout (its own process group: timeout kills the whole group when
# the time is up, -k 15 s later with SIGKILL); if this script is stopped, the group is killed too.
group=""
stop_group() {
  if [ -n "$group" ] && kill -0 "$group" 2>/dev/null; then
    kill -TERM -- "-$group" 2>/dev/null || true
    sleep 2
    kill -KILL -- "-$group" 2>/dev/null || true
  fi
}
trap stop_group EXIT
trap 'exit 130' INT TERM
run() {
  local limit=$1
  shift
  timeout -k 15 "$limit" "$@" &
  group=$!
  local status=0
  wait "$group" || status=$?
  group=""
  if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
    echo "test-balancers: $* ran past ${limit}s" >&2
  fi
  return "$status"
}

start=$(date +%s)
echo "== failover through haproxy (first-user-message hash), haproxy (least connections), nginx"
run 600 .venv/bin/python tests/balancers/failover.py --out "$out/balancers-failover.txt"
echo "== prefix-aware routing (short: 8 agents x 6 steps)"
run 420 .venv/bin/python tests/balancers/prefix_routing.py --agents 8 --steps 6 \
  --out "$out/balancers-prefix-routing.txt"
echo "== balancer tests passed in $(( $(date +%s) - start ))s (tables in $out)"
