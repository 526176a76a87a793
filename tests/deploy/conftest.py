"""Shared helpers of the deployment checks (.ci/test-kubernetes.sh runs them).

The checks read deploy/ as shipped, validate it with real validators (Kubernetes' JSON schemas,
the Prometheus Operator CRD's schema, systemd-analyze, a PromQL parser, kustomize) and run the
real server binary with the command lines the manifests and the unit give it.
"""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
SYSTEMD = ROOT / "deploy" / "systemd"
GRAFANA = ROOT / "deploy" / "grafana"
FIXTURE_MODEL = ROOT / "tests" / "fixtures" / "glm4-tiny"
METRICS_FIXTURE = ROOT / "tests" / "fixtures" / "vllm-metrics.txt"


def load_docs(path: Path) -> list[dict]:
    """The YAML documents of a file (empty ones dropped)."""
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def load_one(path: Path) -> dict:
    docs = load_docs(path)
    assert len(docs) == 1, f"{path}: expected one document, found {len(docs)}"
    return docs[0]


def binary() -> Path:
    """The server binary CI built (.ci/test-kubernetes.sh exports AUTOGLM_BIN)."""
    path = Path(os.environ.get("AUTOGLM_BIN", ""))
    if not path.is_file() or not os.access(path, os.X_OK):
        pytest.fail(
            f"no autoglm binary at {str(path)!r}: build it (cargo build --release -p autoglm-cli) "
            "and run .ci/test-kubernetes.sh, which sets AUTOGLM_BIN"
        )
    return path


def serve_env_names() -> set[str]:
    """The AUTOGLM_* variables of `autoglm serve`, as its --help lists them."""
    out = subprocess.run(
        [str(binary()), "serve", "--help"], capture_output=True, text=True, check=True
    ).stdout
    names = set(re.findall(r"\[env: (AUTOGLM_[A-Z0-9_]+)=", out))
    assert len(names) > 50, f"parsed only {len(names)} variables from serve --help"
    return names


def server_routes() -> set[str]:
    """The fixed paths the server routes (autoglm-core/src/server/router.rs's match)."""
    src = (ROOT / "autoglm-core" / "src" / "server" / "router.rs").read_text()
    routes = set(re.findall(r'^\s*"(/[a-z0-9/_-]*)"\s*=>', src, re.M))
    assert {"/v1/chat/completions", "/metrics"} <= routes, routes
    return routes


class Server:
    """A real `autoglm serve` process, with its log in a file."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path):
        self.argv, self.log_path = argv, log
        self.log = open(log, "wb")
        self.proc = subprocess.Popen(
            argv, env=env, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.url: str | None = None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_listening(self, timeout: float = 60) -> str:
        """Waits for "listening on http://HOST:PORT" in the log; returns HOST:PORT."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"the server exited ({self.proc.returncode}) before listening:\n"
                            f"{self.log_text()}")
            m = re.search(r"listening on http://([0-9.]+:\d+)", self.log_text())
            if m:
                self.url = m.group(1)
                return self.url
            time.sleep(0.05)
        pytest.fail(f"the server did not listen within {timeout} s:\n{self.log_text()}")

    def get(self, path: str, headers: dict | None = None, uds: str | None = None):
        """(status, body) of GET path, on a new connection (TCP, or the Unix socket uds)."""
        if uds:
            conn = http.client.HTTPConnection("localhost", timeout=5)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(5)
            sock.connect(uds)
            conn.sock = sock
        else:
            host, port = self.url.rsplit(":", 1)
            conn = http.client.HTTPConnection(host, int(port), timeout=5)
        try:
            conn.request("GET", path, headers=headers or {})
            r = conn.getresponse()
            return r.status, r.read().decode(errors="replace")
        finally:
            conn.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.log.close()


@pytest.fixture
def start_server(tmp_path):
    """start_server(argv, env) -> Server; every server is killed at the test's end."""
    servers: list[Server] = []

    def start(argv: list[str], env: dict[str, str]) -> Server:
        s = Server(argv, env, tmp_path / f"server{len(servers)}.log")
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


def check_sigterm_drain(server: Server, drain: float, grace: float, limit: float,
                        headers: dict, uds: str | None = None) -> float:
    """SIGTERMs the server and checks the drain the manifests count on: /ready is 503 at once,
    new connections are still served during the drain delay, and the process exits 0 after
    the delay and before `limit` seconds. Returns the seconds it took to exit."""
    t0 = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    # /ready fails "at once": well within the drain delay (the signal is handled asynchronously;
    # a loaded CI machine may take a moment).
    while True:
        status, _ = server.get("/ready")
        if status == 503:
            break
        assert status == 200, status
        assert time.monotonic() - t0 < 2, "/ready still 200 two seconds after SIGTERM"
        time.sleep(0.02)
    if uds:
        assert server.get("/ready", uds=uds)[0] == 503
    # Still accepting and serving during the drain delay (a new connection each time).
    if drain >= 2:
        time.sleep(min(drain / 2, drain - 1))
        assert time.monotonic() - t0 < drain
        status, body = server.get("/v1/models", headers)
        assert status == 200, f"during the drain delay: {status} {body}"
    try:
        rc = server.proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the server still ran {limit} s after SIGTERM:\n{server.log_text()}")
    took = time.monotonic() - t0
    assert rc == 0, f"exit code {rc} after SIGTERM:\n{server.log_text()}"
    assert took >= drain - 0.5, f"exited after {took:.1f} s, before the drain delay of {drain} s"
    assert took < drain + grace, f"exited after {took:.1f} s with nothing open"
    return took
