"""Fixtures for the OpenAI-client tests of the autoglm server.

With AUTOGLM_SERVER_URL set (as .ci/test-server.sh does), the tests use that server. Otherwise they
start `target/release/autoglm serve` on a free loopback port (build it first with
`cargo build --release -p autoglm-cli`) and stop it afterwards.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import time
import urllib.request

import openai
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "glm4-tiny"
MODEL = os.environ.get("AUTOGLM_MODEL", "glm4-tiny")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, proc: subprocess.Popen | None, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url}/ready did not answer 200 within {timeout:.0f}s")


@pytest.fixture(scope="session")
def base_url():
    url = os.environ.get("AUTOGLM_SERVER_URL")
    if url:
        yield url.rstrip("/")
        return
    binary = ROOT / "target" / "release" / "autoglm"
    if not binary.exists():
        pytest.fail("no server: set AUTOGLM_SERVER_URL or build `autoglm` (cargo build --release -p autoglm-cli)")
    port = _free_port()
    proc = subprocess.Popen(
        [str(binary), "serve", "--host", "127.0.0.1", "--port", str(port), "--model", f"{MODEL}={FIXTURE}",
         "--tool-call-parser", "glm45", "--enable-auto-tool-choice", "--generation-config", "vllm"],
        stdout=subprocess.DEVNULL,
        # Not a pipe: one nobody reads would fill with the access log and block the server.
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="session")
def client(base_url) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=base_url + "/v1",
        api_key=os.environ.get("AUTOGLM_API_KEY", "unused"),
        max_retries=0,
        timeout=120,
    )


@pytest.fixture(scope="session")
def expected() -> dict:
    return json.loads((FIXTURE / "expected.json").read_text())


@pytest.fixture(scope="session")
def post(base_url):
    """POSTs JSON to a non-OpenAI route (/tokenize, /detokenize) and returns the parsed answer."""

    def _post(path: str, body: dict) -> dict:
        req = urllib.request.Request(
            base_url + path,
            data=json.dumps(body).encode(),
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())

    return _post
