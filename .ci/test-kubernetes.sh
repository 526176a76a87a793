#!/usr/bin/env bash
# The deployment configurations of deploy/ (issue 17): deploy/kubernetes, deploy/grafana and
# deploy/systemd, checked without a cluster or an init system (neither exists on CI's machine):
#   - every manifest, and the rendered kustomization (kubectl kustomize), against the JSON
#     schemas of Kubernetes 1.30 and of the newest release kubernetes-validate knows (strict:
#     unknown fields fail); the ServiceMonitor against the prometheus-operator CRD's schema;
#   - negative checks: broken copies must be rejected, so the validators are known to bite;
#   - cross-references: selectors, ports, probe paths vs the server's routes, the grace period
#     vs the server's drain, volumes vs args;
#   - the Deployment's command line and the systemd unit's ExecStart run for real on the bundled
#     model (loopback), probed, then stopped with SIGTERM (exit code 0 after the drain);
#   - systemd-analyze verify and security; the sysctl drop-in's keys;
#   - every metric name of the Grafana dashboard, the HPA and the adapter rules against
#     tests/fixtures/vllm-metrics.txt, every query parsed as PromQL.
# Needs the server binary, which .ci/test-server.sh builds: ${CARGO_TARGET_DIR:-target}/release/autoglm.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)

bin="${CARGO_TARGET_DIR:-target}/release/autoglm"
if [ ! -x "$bin" ]; then
  echo "no server binary at $bin: build it first (cargo build --release -p autoglm-cli)" >&2
  exit 1
fi
AUTOGLM_BIN=$(realpath "$bin")
export AUTOGLM_BIN

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
apt_updated=""
apt_install() {
  [ -n "$apt_updated" ] || { $sudo apt-get update -qq; apt_updated=1; }
  $sudo apt-get install -y -qq "$@" >/dev/null
}

echo "== tools"
# kustomize: kubectl's built-in (Debian 12's kubernetes-client is kubectl 1.20 with kustomize v2;
# a newer kubectl already on the machine is used as it is).
command -v kubectl >/dev/null 2>&1 || apt_install kubernetes-client
# systemd-analyze (verify, security --offline) works without systemd running.
command -v systemd-analyze >/dev/null 2>&1 || apt_install systemd
kubectl version --client 2>/dev/null | grep -i -m2 'version' || true
systemd-analyze --version | head -1

echo "== python venv (.venv-k8s) with tests/deploy/requirements.txt"
if [ ! -x .venv-k8s/bin/python ]; then
  if ! python3 -m venv .venv-k8s 2>/dev/null; then
    apt_install python3-venv
    python3 -m venv .venv-k8s
  fi
fi
stamp=.venv-k8s/requirements.sha256
want=$(sha256sum tests/deploy/requirements.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv-k8s/bin/python -m pip install -q --disable-pip-version-check -r tests/deploy/requirements.txt
  echo "$want" >"$stamp"
fi

echo "== metric names used by deploy/ (dashboard, adapter rules, HPA)"
# Autoloaded plugins stay off: cloudcoil registers a pytest plugin that starts clusters.
export PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
(cd tests/deploy && ../../.venv-k8s/bin/python -c '
import test_metrics_names as t
names = t.exposed()
missing = "MISSING from tests/fixtures/vllm-metrics.txt"
for name, where in sorted(t.used_names().items()):
    print(f"  {name:45} {names.get(t.resolve(name, names), missing)}")
')

echo "== pytest tests/deploy"
.venv-k8s/bin/python -m pytest -q -p no:cacheprovider tests/deploy
echo "== deploy checks passed in $(( $(date +%s) - start )) s"
