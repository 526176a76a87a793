#!/usr/bin/env bash
# The container images (deploy/docker/, docs/DEPLOY.md section 2). Installs docker.io and
# debootstrap when missing, starts dockerd when none answers (and stops it at the end only then),
# makes the Debian base images (deploy/docker/make-base-images.sh: no registry is needed), builds
# the cuda and cpu targets out of one compile, then checks:
#   cpu:  image metadata (numeric non-root USER, HEALTHCHECK, STOPSIGNAL, port, no compiler);
#         a container on a loopback port (--read-only, --cap-drop ALL): /health and /ready 200,
#         its process runs as UID 10001 on the host, docker's health check turns `healthy`, the
#         API key from AUTOGLM_API_KEYS is enforced, one chat completion through the official
#         `openai` client, and `docker stop` (SIGTERM) drains (/ready 503) and ends it with exit
#         code 0 well within the grace time;
#   cuda: cuBLAS, cuBLASLt and NVRTC resolve and load in the image (ld.so loads them by soname),
#         and without a GPU it serves on the CPU saying why (no libcuda), or, with --device cuda,
#         exits 1 naming the missing driver. Nothing here runs on a GPU.
# Prints the build time, the image sizes and the disk use. Environment: AUTOGLM_IMAGE (image
# name, default autoglm: tags :cpu and :cuda) and DOCKER (the client).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
IMAGE=${AUTOGLM_IMAGE:-autoglm}
UID_WANT=10001
KEY="ci-key-$$-$RANDOM"
BUILDER_TAG=autoglm-base/debian:bookworm
RUNTIME_TAG=autoglm-base/debian:bookworm-slim
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
fail() { echo "FAIL: $*" >&2; exit 1; }
step() { echo "== $(date -u +%H:%M:%S) $*"; }

step "disk before"
df -h / | tail -1

step "tools: docker.io and debootstrap"
if ! command -v dockerd >/dev/null 2>&1 || ! command -v debootstrap >/dev/null 2>&1; then
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq docker.io debootstrap >/dev/null
fi
# The client: Debian's docker.io (20.10) builds with BuildKit by itself; a newer client needs the
# buildx plugin for that. Without BuildKit the legacy builder still works, building every stage
# before the target (slower, same images).
if [ -z "${DOCKER:-}" ]; then
  if [ -x /usr/bin/docker ]; then DOCKER=/usr/bin/docker; else DOCKER=$(command -v docker); fi
fi
client=$("$DOCKER" version --format '{{.Client.Version}}' 2>/dev/null || true)
if [ "${client%%.*}" -lt 23 ] 2>/dev/null || "$DOCKER" buildx version >/dev/null 2>&1; then
  export DOCKER_BUILDKIT=1
  builder="BuildKit"
  progress=(--progress=plain)
else
  export DOCKER_BUILDKIT=0
  builder="the legacy builder (no buildx for client $client)"
  progress=()
fi

started_dockerd=""
containers=()
tmp=$(mktemp -d)
cleanup() {
  local status=$?
  for c in "${containers[@]}"; do
    if "$DOCKER" inspect "$c" >/dev/null 2>&1; then
      if [ "$status" -ne 0 ]; then
        echo "--- logs of $c" >&2
        "$DOCKER" logs --tail 40 "$c" >&2 2>&1 || true
      fi
      "$DOCKER" rm -f "$c" >/dev/null 2>&1 || true
    fi
  done
  if [ -n "$started_dockerd" ]; then
    echo "stopping the dockerd this script started (pid $started_dockerd)"
    $sudo kill -TERM "$started_dockerd" 2>/dev/null || true
    for _ in $(seq 150); do $sudo kill -0 "$started_dockerd" 2>/dev/null || break; sleep 0.2; done
  fi
  rm -rf "$tmp"
  [ "$status" -eq 0 ] || echo "test-docker.sh failed (exit $status)" >&2
}
trap cleanup EXIT

step "dockerd"
if ! timeout 20 "$DOCKER" info >/dev/null 2>&1; then
  echo "no dockerd answers; starting one (log: /tmp/test-docker-dockerd.log)"
  $sudo dockerd >/tmp/test-docker-dockerd.log 2>&1 &
  started_dockerd=$!
  for _ in $(seq 60); do timeout 5 "$DOCKER" info >/dev/null 2>&1 && break; sleep 1; done
  timeout 20 "$DOCKER" info >/dev/null 2>&1 || { tail -20 /tmp/test-docker-dockerd.log >&2; fail "dockerd did not answer within 60 s"; }
fi
echo "client $DOCKER $client, server $("$DOCKER" version --format '{{.Server.Version}}'), builder: $builder"

step "base images (debootstrap, unless they exist)"
t=$SECONDS
timeout 900 $sudo env DOCKER="$DOCKER" bash deploy/docker/make-base-images.sh
base_s=$((SECONDS - t))

step "build: targets cuda and cpu, one compile"
build_args=(--build-arg "BUILDER_IMAGE=$BUILDER_TAG" --build-arg "RUNTIME_IMAGE=$RUNTIME_TAG")
# A proxy that re-signs TLS (its CA added to this machine's store) must be trusted by cargo and
# pip inside the build too.
extra_ca=$(cat /usr/local/share/ca-certificates/*.crt 2>/dev/null || true)
if [ -n "$extra_ca" ]; then
  echo "trusting this machine's /usr/local/share/ca-certificates/*.crt in the build stages"
  build_args+=(--build-arg "EXTRA_CA_CERTS=$extra_ca")
fi
build() {
  local target=$1 log="$tmp/build-$1.log"
  if ! timeout 3600 "$DOCKER" build "${progress[@]}" -f deploy/docker/Dockerfile "${build_args[@]}" \
    --target "$target" -t "$IMAGE:$target" . >"$log" 2>&1; then
    tail -60 "$log" >&2
    fail "docker build --target $target"
  fi
  grep -E "CUDA libraries:|Finished .release|^autoglm [0-9]|cargo [0-9]+\.|rustc [0-9]+\." "$log" | sed 's/^#[0-9]* [0-9.]* */  /' | sort -u || true
}
t=$SECONDS
build cuda
build_cuda_s=$((SECONDS - t))
t=$SECONDS
build cpu
build_cpu_s=$((SECONDS - t))
echo "build: cuda target ${build_cuda_s} s (with the compile), then cpu target ${build_cpu_s} s"

python=.venv/bin/python
if [ ! -x "$python" ] || ! "$python" -c 'import openai' 2>/dev/null; then
  step "python venv (.venv) with openai"
  [ -x "$python" ] || python3 -m venv .venv
  "$python" -m pip install -q openai
fi

step "cpu image: metadata"
inspect() { "$DOCKER" image inspect -f "$1" "$IMAGE:cpu"; }
[ "$(inspect '{{.Config.User}}')" = "$UID_WANT:$UID_WANT" ] || fail "USER is '$(inspect '{{.Config.User}}')', want $UID_WANT:$UID_WANT"
[ "$(inspect '{{.Config.StopSignal}}')" = "SIGTERM" ] || fail "STOPSIGNAL is '$(inspect '{{.Config.StopSignal}}')'"
grep -q '"8000/tcp"' <<<"$(inspect '{{json .Config.ExposedPorts}}')" || fail "port 8000 is not exposed"
grep -q 'autoglm-healthcheck' <<<"$(inspect '{{json .Config.Healthcheck.Test}}')" || fail "no HEALTHCHECK"
[ "$(inspect '{{json .Config.Entrypoint}}')" = '["/usr/local/bin/autoglm","serve"]' ] || fail "ENTRYPOINT is $(inspect '{{json .Config.Entrypoint}}')"
echo "user $(inspect '{{.Config.User}}'), entrypoint $(inspect '{{json .Config.Entrypoint}}') $(inspect '{{json .Config.Cmd}}'), health $(inspect '{{json .Config.Healthcheck.Test}}')"
# Nothing to compile with, and the bundled model is there.
"$DOCKER" run --rm --entrypoint bash "$IMAGE:cpu" -c '
  for t in cargo rustc gcc cc c++ ld as make python3 curl; do
    if command -v "$t" >/dev/null; then echo "the runtime image has $t" >&2; exit 1; fi
  done
  test -s /opt/autoglm/models/glm4-tiny/config.json && test -s /opt/autoglm/models/glm4-tiny/tokenizer.json
  echo "no compiler or toolchain; bundled model: $(ls /opt/autoglm/models/glm4-tiny | tr "\n" " ")"
  echo "autoglm $(du -h /usr/local/bin/autoglm | cut -f1), $(/usr/local/bin/autoglm --version)"' ||
  fail "runtime image contents"

# wait_ready URL SECONDS: until GET URL/ready is 200.
wait_ready() {
  "$python" - "$1" "$2" <<'PY' || return 1
import sys, time, urllib.request
url, limit = sys.argv[1], float(sys.argv[2])
deadline = time.monotonic() + limit
while time.monotonic() < deadline:
    try:
        with urllib.request.urlopen(url + "/ready", timeout=2) as r:
            if r.status == 200:
                sys.exit(0)
    except OSError:
        pass
    time.sleep(0.25)
sys.exit(f"{url}/ready did not answer 200 within {limit:.0f} s")
PY
}
# run NAME ARGS...: starts a detached container publishing 8000 on a free loopback port; sets URL.
run() {
  local name=$1
  shift
  containers+=("$name")
  "$DOCKER" run -d --name "$name" -p 127.0.0.1::8000 "$@" >/dev/null
  local port
  port=$("$DOCKER" port "$name" 8000/tcp | head -1 | sed 's/.*://')
  [ -n "$port" ] || fail "$name: no published port"
  URL="http://127.0.0.1:$port"
}

step "cpu image: run"
name="autoglm-ci-cpu-$$"
t=$SECONDS
# Hardened as docs/DEPLOY.md suggests: nothing written, no capabilities, no privilege gain.
run "$name" --stop-timeout 45 --read-only --cap-drop ALL --security-opt no-new-privileges \
  -e AUTOGLM_API_KEYS="$KEY" "$IMAGE:cpu"
wait_ready "$URL" 120 || fail "$name was not ready"
echo "ready at $URL after $((SECONDS - t)) s"
"$python" - "$URL" <<'PY' || fail "/health and /ready"
import sys, urllib.request
for path in ("/health", "/ready"):
    with urllib.request.urlopen(sys.argv[1] + path, timeout=5) as r:
        assert r.status == 200, (path, r.status)
        print(f"GET {path}: {r.status}")
PY

pid=$("$DOCKER" inspect -f '{{.State.Pid}}' "$name")
uid=$(awk '/^Uid:/ {print $2}' "/proc/$pid/status")
comm=$(cat "/proc/$pid/comm")
[ "$uid" = "$UID_WANT" ] || fail "the container's process $pid ($comm) runs as UID $uid, want $UID_WANT"
in_container=$("$DOCKER" exec "$name" id -u)
[ "$in_container" = "$UID_WANT" ] || fail "docker exec id -u: $in_container"
echo "process $pid ($comm) runs as UID $uid on the host (id -u inside: $in_container)"

t=$SECONDS
health=""
for _ in $(seq 120); do
  health=$("$DOCKER" inspect -f '{{.State.Health.Status}}' "$name")
  [ "$health" = healthy ] && break
  [ "$health" = unhealthy ] && break
  sleep 0.5
done
[ "$health" = healthy ] || fail "health status '$health' after $((SECONDS - t)) s: $("$DOCKER" inspect -f '{{json .State.Health}}' "$name")"
echo "docker health: $health after $((SECONDS - t)) s more; last probe: $("$DOCKER" inspect -f '{{range .State.Health.Log}}{{.Output}}{{end}}' "$name" | grep . | tail -1)"

"$python" - "$URL" "$KEY" <<'PY' || fail "chat completion through the openai client"
import sys
import openai
url, key = sys.argv[1], sys.argv[2]
# The key given by AUTOGLM_API_KEYS is required...
try:
    openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0, timeout=60).models.list()
    sys.exit("a wrong API key was accepted")
except openai.AuthenticationError as e:
    print(f"wrong key: {e.status_code}")
client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)
models = [m.id for m in client.models.list()]
assert models == ["glm4-tiny"], models
r = client.chat.completions.create(
    model="glm4-tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=8, temperature=0
)
choice = r.choices[0]
assert r.model == "glm4-tiny", r.model
assert isinstance(choice.message.content, str) and choice.message.content, choice
assert choice.finish_reason in ("length", "stop"), choice.finish_reason
assert 0 < r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 0, r.usage
print(f"models {models}; chat completion: {r.usage.prompt_tokens} prompt + "
      f"{r.usage.completion_tokens} completion tokens, finish_reason {choice.finish_reason}")
PY

step "cpu image: docker stop (SIGTERM) drains and exits 0"
t0=$EPOCHREALTIME
"$DOCKER" stop -t 45 "$name" >/dev/null &
stopper=$!
# Within --shutdown-drain-delay (5 s) /ready answers 503 while connections are still served.
"$python" - "$URL" <<'PY' || { wait "$stopper" || true; fail "no 503 from /ready while draining"; }
import sys, time, urllib.error, urllib.request
deadline = time.monotonic() + 5
while time.monotonic() < deadline:
    try:
        urllib.request.urlopen(sys.argv[1] + "/ready", timeout=1).close()
    except urllib.error.HTTPError as e:
        if e.code == 503:
            print("draining: /ready 503")
            sys.exit(0)
    except OSError as e:
        sys.exit(f"/ready: {e} before any 503")
    time.sleep(0.05)
sys.exit("/ready never answered 503")
PY
wait "$stopper" || fail "docker stop failed"
elapsed=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')
code=$("$DOCKER" inspect -f '{{.State.ExitCode}}' "$name")
oom=$("$DOCKER" inspect -f '{{.State.OOMKilled}}' "$name")
[ "$code" = 0 ] || fail "exit code $code after docker stop (137 is SIGKILL: not stopped within 45 s)"
[ "$oom" = false ] || fail "OOM killed"
logs=$("$DOCKER" logs "$name" 2>&1)
grep -q "SIGTERM: stopping" <<<"$logs" || fail "the log has no SIGTERM line"
grep -q "INFO autoglm_cli::serve: stopped" <<<"$logs" || fail "the log has no 'stopped' line"
echo "docker stop: exit code $code after ${elapsed} s (grace 45 s); log: $(grep -o 'SIGTERM: stopping.*' <<<"$logs" | cut -c1-60)..."

step "cuda image: the CUDA 13 libraries are there and load"
"$DOCKER" run --rm --entrypoint bash "$IMAGE:cuda" -c '
  set -e
  cd /opt/autoglm/cuda/lib
  ls -l --block-size=M
  if ldd ./*.so* | grep "not found"; then echo "unresolved dependencies" >&2; exit 1; fi
  libs=$(ls)
  # ld.so loads each by soname, searched as dlopen searches (LD_LIBRARY_PATH), and runs its
  # initialisers before autoglm starts; a missing one is an "ERROR: ld.so" line.
  out=$(LD_DEBUG=libs LD_PRELOAD="$(echo $libs)" /usr/local/bin/autoglm --version 2>&1)
  if grep "ERROR: ld.so" <<<"$out"; then exit 1; fi
  for lib in $libs; do
    grep -q "calling init: /opt/autoglm/cuda/lib/$lib" <<<"$out" || { echo "$lib was not loaded" >&2; exit 1; }
    echo "loaded by soname: $lib"
  done
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH NVIDIA_VISIBLE_DEVICES=$NVIDIA_VISIBLE_DEVICES NVIDIA_DRIVER_CAPABILITIES=$NVIDIA_DRIVER_CAPABILITIES"
  grep "^autoglm [0-9]" <<<"$out"' || fail "CUDA libraries in $IMAGE:cuda"

step "cuda image without a GPU: --device cuda fails naming the driver"
set +e
out=$(timeout 120 "$DOCKER" run --rm -e AUTOGLM_DEVICE=cuda "$IMAGE:cuda" 2>&1)
code=$?
set -e
echo "$out" | tail -3
[ "$code" = 1 ] || fail "--device cuda without a GPU: exit code $code, want 1"
grep -q "libcuda.so) was not found" <<<"$out" || fail "--device cuda: no message naming libcuda"

step "cuda image without a GPU: the default device (auto) serves on the CPU"
name="autoglm-ci-cuda-$$"
run "$name" -e AUTOGLM_SHUTDOWN_DRAIN_DELAY=0 "$IMAGE:cuda"
wait_ready "$URL" 120 || fail "$name was not ready"
logs=$("$DOCKER" logs "$name" 2>&1)
line=$(grep "CUDA unavailable; running on the CPU" <<<"$logs") || fail "no 'CUDA unavailable; running on the CPU' line"
echo "${line:0:220}"
grep -q "libcuda.so) was not found" <<<"$line" || fail "the fallback does not say libcuda is missing"
"$DOCKER" stop -t 30 "$name" >/dev/null
code=$("$DOCKER" inspect -f '{{.State.ExitCode}}' "$name")
[ "$code" = 0 ] || fail "$name: exit code $code after docker stop"
echo "served on the CPU, stopped with exit code $code"

step "image sizes and build time"
for c in "${containers[@]}"; do "$DOCKER" rm -f "$c" >/dev/null 2>&1 || true; done
containers=()
"$DOCKER" image ls --format '{{.Repository}}:{{.Tag}}\t{{.Size}}' |
  grep -E "^($IMAGE:(cpu|cuda)|autoglm-base/debian:bookworm(-slim)?)\b" | sort
echo "base images ${base_s} s, build of cuda+cpu ${build_cuda_s}+${build_cpu_s} s, this script $((SECONDS - start)) s"
"$DOCKER" system df
df -h / | tail -1
echo "== docker ok"
