"""The in-process server (`autoglm.Server`, `autoglm.serve`) and the `autoglm` console script,
queried with the official `openai` client on the glm4-tiny fixture.

Greedy answers (temperature 0, ignore_eos) must equal the fixture's transformers-computed greedy
tokens, and their text what the in-process engine gives for the same request.
"""

from __future__ import annotations

import errno
import http.client
import inspect
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

import autoglm
from autoglm import cli
from conftest import FIXTURES, greedy

TINY = FIXTURES / "glm4-tiny"
NAME = "glm4-tiny"
GREEDY: dict[str, object] = {"ignore_eos": True, "return_token_ids": True}


def client_for(url: str, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def server() -> Iterator[autoglm.Server]:
    with autoglm.Server(TINY, port=0, device="cpu") as s:
        yield s
    assert not s.running


@pytest.fixture(scope="module")
def client(server: autoglm.Server) -> openai.OpenAI:
    return client_for(server.url)


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


# In-process: autoglm.Server


def test_a_started_server_tells_its_address(server: autoglm.Server) -> None:
    assert server.running
    assert server.models == [NAME]
    assert server.port > 0
    assert server.url == f"http://127.0.0.1:{server.port}"
    assert server.addresses == [f"127.0.0.1:{server.port}"]
    assert server.shutdown_grace == 30.0
    assert repr(server) == (
        f"Server(models=['{NAME}'], addresses=['127.0.0.1:{server.port}'], running=True)"
    )
    with urllib.request.urlopen(server.url + "/ready", timeout=10) as r:
        assert r.status == 200
    # Not done: wait() times out while the server runs.
    assert server.wait(timeout=0.05) is False


def test_models_are_listed(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == [NAME]


@pytest.mark.parametrize("case", [0, 1, 2])
def test_completion_greedy_tokens_match_the_fixture(
    client: openai.OpenAI, engine: autoglm.Engine, glm4: dict[str, Any], case: int
) -> None:
    c = glm4["cases"][case]
    r = client.completions.create(
        model=NAME, prompt=c["prompt_token_ids"], max_tokens=24, temperature=0, extra_body=GREEDY
    )
    choice = r.choices[0]
    assert choice.model_extra is not None
    assert choice.model_extra["token_ids"] == c["greedy_token_ids"]
    assert choice.text == engine.generate(c["prompt_token_ids"], greedy(24)).text
    assert choice.finish_reason == "length"
    assert r.usage is not None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(c["prompt_token_ids"]), 24)


def test_stream_interval_keeps_one_event_per_token(glm4: dict[str, Any]) -> None:
    c = glm4["cases"][0]
    with autoglm.Server(TINY, port=0, device="cpu", stream_interval=4) as s:
        stream = client_for(s.url).completions.create(
            model=NAME, prompt=c["prompt_token_ids"], max_tokens=24, temperature=0,
            stream=True, extra_body=GREEDY,
        )
        ids = [chunk.choices[0].model_extra["token_ids"] for chunk in stream]  # type: ignore[index]
    assert ids == [[t] for t in c["greedy_token_ids"]]


@pytest.mark.parametrize("chat", [0, 1])
def test_chat_greedy_equals_the_engine_on_the_rendered_template(
    client: openai.OpenAI, engine: autoglm.Engine, glm4: dict[str, Any], chat: int
) -> None:
    ch = glm4["chat"][chat]
    r = client.chat.completions.create(
        model=NAME, messages=ch["messages"], max_tokens=24, temperature=0, extra_body=GREEDY
    )
    want = engine.generate(ch["token_ids"], greedy(24))
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == want.text
    assert choice.model_extra is not None
    assert choice.model_extra["token_ids"] == want.token_ids
    assert r.usage is not None and r.usage.prompt_tokens == len(ch["token_ids"])

    chunks = list(
        client.chat.completions.create(
            model=NAME,
            messages=ch["messages"],
            max_tokens=24,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text


def test_several_models_with_api_keys(glm4: dict[str, Any]) -> None:
    c = glm4["cases"][0]
    with autoglm.Server(
        models={"a": TINY, "b": FIXTURES / "glm-tiny-bf16"},
        port=0,
        device="cpu",
        api_keys=["sk-user", {"key": "sk-low", "priority": 5}],
        admin_api_keys="sk-admin",
    ) as s:
        assert s.models == ["a", "b"]
        with pytest.raises(openai.AuthenticationError):
            client_for(s.url, "sk-wrong").models.list()
        for key in ("sk-user", "sk-low", "sk-admin"):
            assert [m.id for m in client_for(s.url, key).models.list()] == ["a", "b"]
        user = client_for(s.url, "sk-user")
        r = user.completions.create(
            model="a", prompt=c["prompt_token_ids"], max_tokens=24, temperature=0, extra_body=GREEDY
        )
        assert r.choices[0].model_extra is not None
        assert r.choices[0].model_extra["token_ids"] == c["greedy_token_ids"]
        r = user.completions.create(model="b", prompt="Hello", max_tokens=4, temperature=0)
        assert r.model == "b" and r.usage is not None and r.usage.completion_tokens > 0
        # /metrics is for role admin.
        req = urllib.request.Request(s.url + "/metrics", headers={"authorization": "Bearer sk-user"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)
        assert e.value.code == 403
        req = urllib.request.Request(s.url + "/metrics", headers={"authorization": "Bearer sk-admin"})
        with urllib.request.urlopen(req, timeout=10) as m:
            assert m.status == 200


def test_cors_origins_and_public_metrics() -> None:
    origin = "https://app.example.com"
    with autoglm.Server(
        TINY,
        port=0,
        device="cpu",
        api_keys="sk-user",
        allowed_origins=[origin],
        metrics_public=True,
    ) as s:
        # /metrics without any key.
        with urllib.request.urlopen(s.url + "/metrics", timeout=10) as m:
            assert m.status == 200
        # A preflight needs no key; the response to the origin names it.
        req = urllib.request.Request(
            s.url + "/v1/models",
            method="OPTIONS",
            headers={"origin": origin, "access-control-request-method": "GET"},
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 204
            assert r.headers["access-control-allow-origin"] == origin
            assert "authorization" in r.headers["access-control-allow-headers"]
        req = urllib.request.Request(
            s.url + "/v1/models", headers={"origin": origin, "authorization": "Bearer sk-user"}
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.headers["access-control-allow-origin"] == origin
            assert r.headers["vary"] == "Origin"


def test_stop_frees_the_port_is_idempotent_and_the_server_starts_again() -> None:
    s = autoglm.Server(TINY, port=0, device="cpu", served_model_name="tiny")
    assert not s.running and s.models == ["tiny"] and s.addresses == ["127.0.0.1:0"]
    with pytest.raises(autoglm.ServerError, match="not running"):
        s.url
    assert s.start() is s
    port = s.port
    with pytest.raises(autoglm.ServerError, match="already running"):
        s.start()
    assert [m.id for m in client_for(s.url).models.list()] == ["tiny"]
    s.stop()
    assert not s.running and s.wait() is True
    assert refused(port)
    s.stop()
    with pytest.raises(autoglm.ServerError, match="not running"):
        s.port
    with s:
        assert s.running
        assert [m.id for m in client_for(s.url).models.list()] == ["tiny"]
    assert not s.running


def test_graceful_shutdown_lets_an_open_stream_finish() -> None:
    s = autoglm.Server(TINY, port=0, device="cpu").start()
    try:
        c = client_for(s.url)
        chunks = iter(
            c.completions.create(
                model=NAME, prompt=[277], max_tokens=300, temperature=0, stream=True,
                extra_body=GREEDY,
            )
        )
        first = next(chunks)
        s.shutdown()
        assert not s.running
        rest = list(chunks)
        ids = [t for ch in [first, *rest] for t in (ch.choices[0].model_extra or {}).get("token_ids", [])]
        assert len(ids) == 300
        assert [ch.choices[0].finish_reason for ch in rest][-1] == "length"
        assert s.wait(timeout=30) is True
        with pytest.raises(openai.APIConnectionError):
            client_for(s.url).models.list()
    finally:
        s.stop()
    assert not s.running


def test_stop_from_another_thread_ends_wait() -> None:
    s = autoglm.Server(TINY, port=0, device="cpu").start()
    stopper = threading.Timer(0.3, s.stop)
    stopper.start()
    t0 = time.monotonic()
    try:
        assert s.wait(timeout=60) is True
        assert time.monotonic() - t0 < 30
    finally:
        stopper.join()
        s.stop()
    assert not s.running


def test_forced_stop_does_not_wait_for_a_stalled_request() -> None:
    # A client that sends half a body keeps a request open; only `force` stops without waiting.
    s = autoglm.Server(TINY, port=0, device="cpu", shutdown_grace=60).start()
    with socket.create_connection(("127.0.0.1", s.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: 100\r\n\r\n{\"model\": "
        )
        time.sleep(0.2)
        s.shutdown()
        assert s.wait(timeout=1.0) is False
        t0 = time.monotonic()
        s.stop(force=True)
        assert time.monotonic() - t0 < 10
    assert not s.running


def test_unix_socket_only(tmp_path: Path) -> None:
    path = tmp_path / "autoglm.sock"
    with autoglm.Server(TINY, host=None, unix_socket=path, device="cpu") as s:
        assert s.addresses == [f"unix:{path}"]
        with pytest.raises(autoglm.ServerError, match="no TCP"):
            s.url
        conn = http.client.HTTPConnection("localhost", timeout=30)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(path))
        conn.sock = sock
        body = json.dumps({"model": NAME, "prompt": [277], "max_tokens": 3, "ignore_eos": True})
        conn.request("POST", "/v1/completions", body, {"content-type": "application/json"})
        r = conn.getresponse()
        assert r.status == 200
        assert json.loads(r.read())["usage"]["completion_tokens"] == 3
        conn.close()


def test_config_mapping_reaches_the_server() -> None:
    with autoglm.Server(
        TINY, port=0, device="cpu", config={"http": {"max_headers": 8}}
    ) as s:
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
        conn.request("GET", "/health", headers={f"x-{i}": "a" for i in range(4)})
        assert conn.getresponse().status == 200
        conn.close()
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
        conn.request("GET", "/health", headers={f"x-{i}": "a" for i in range(16)})
        assert conn.getresponse().status == 431
        conn.close()


def test_serve_takes_the_arguments_of_server() -> None:
    assert inspect.signature(autoglm.serve).parameters == inspect.signature(autoglm.Server).parameters
    params = inspect.signature(autoglm.Server).parameters
    assert params["host"].default == "127.0.0.1" and params["port"].default == 8000


# Errors


def test_port_in_use_is_a_server_error() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        s = autoglm.Server(TINY, port=port, device="cpu")
        with pytest.raises(autoglm.ServerError, match=f"127.0.0.1:{port}.*already in use") as e:
            s.start()
        assert isinstance(e.value, OSError) and isinstance(e.value, autoglm.AutoglmError)
        assert e.value.errno == errno.EADDRINUSE
        assert not s.running


def test_a_second_server_on_the_same_port_fails(server: autoglm.Server, client: openai.OpenAI) -> None:
    with pytest.raises(autoglm.ServerError, match="already in use"):
        autoglm.Server(TINY, port=server.port, device="cpu").start()
    assert server.running
    assert [m.id for m in client.models.list()] == [NAME]


def test_missing_model_dir(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    s = autoglm.Server(missing, port=0, device="cpu")
    with pytest.raises(autoglm.ModelLoadError, match="no-such-model") as e:
        s.start()
    assert e.value.path is not None and "no-such-model" in e.value.path
    assert not s.running


def test_unreadable_tls_files_are_server_errors(tmp_path: Path) -> None:
    s = autoglm.Server(
        TINY, port=0, device="cpu", tls_cert=tmp_path / "cert.pem", tls_key=tmp_path / "key.pem"
    )
    with pytest.raises(autoglm.ServerError, match="cert.pem"):
        s.start()
    assert not s.running


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"port": 70000}, "port = 70000: must be an int in 0..=65535"),
        ({"port": -1}, "port = -1"),
        ({"port": "80"}, "port = '80': must be an int"),
        ({"host": "example.com"}, "not an IP address"),
        ({"host": None}, "nothing to listen on"),
        ({"workers": 0}, "workers = 0"),
        ({"http_cores": [100000]}, "core 100000 is not available to this process"),
        ({"http_cores": "1"}, "http_cores = '1': must be a list of core ids"),
        ({"max_connections": 0}, "max_connections"),
        ({"max_connections_per_ip": 0}, "http.max_connections_per_ip"),
        ({"stream_write_timeout": -1}, "stream_write_timeout = -1"),
        ({"stream_write_timeout": 1e10}, "stream_write_timeout"),
        ({"tokens_per_minute": 0.5}, "auth.default_limits.tokens_per_minute"),
        ({"stream_interval": 0}, "stream_interval"),
        ({"stream_interval": 257}, "stream_interval"),
        ({"shutdown_grace": -1}, "shutdown_grace = -1"),
        ({"shutdown_drain_delay": -1}, "shutdown_drain_delay = -1"),
        ({"shutdown_drain_delay": 1e10}, "shutdown_drain_delay"),
        ({"unload_timeout": -1}, "unload_timeout = -1"),
        ({"unload_timeout": 1e10}, "unload_timeout"),
        ({"prefix_cache_scope": "tenant"}, "prefix_cache_scope"),
        ({"allowed_origins": ["https://app.example.com/"]}, "cors.allowed_origins"),
        ({"request_timeout": float("nan")}, "request_timeout"),
        ({"requests_per_minute": 0}, "requests_per_minute = 0: must be > 0"),
        ({"tls_cert": "cert.pem"}, "tls_cert and tls_key"),
        ({"audit_log_prompts": True}, "audit_log_prompts needs audit_log"),
        ({"api_keys": [""]}, "key 0 is empty"),
        ({"api_keys": [1]}, "api_keys"),
        ({"api_keys": [{"key": "k", "role": "nobody"}]}, "nobody"),
        ({"admin_api_keys": [{"key": "k"}]}, "admin_api_keys"),
        ({"config": {"no_such_field": 1}}, "unknown field `no_such_field`"),
        ({"config": [1]}, "mapping"),
        ({"max_num_seqs": -1}, "max_num_seqs"),
        ({"device": "tpu"}, "tpu"),
        ({"prot": 80}, "unknown option \"prot\""),
        ({"models": {NAME: TINY}}, f"two models are named \"{NAME}\""),
        ({"models": {"a\n": TINY}}, "invalid model name"),
        ({"models": [TINY]}, "models"),
    ],
)
def test_bad_options_raise_invalid_request_error(options: dict[str, Any], message: str) -> None:
    with pytest.raises(autoglm.InvalidRequestError, match=re.escape(message)):
        autoglm.Server(TINY, **options)


def test_a_model_is_required() -> None:
    with pytest.raises(autoglm.InvalidRequestError, match="no model to serve"):
        autoglm.Server()
    with pytest.raises(autoglm.InvalidRequestError, match="served_model_name"):
        autoglm.Server(served_model_name="x", models={"a": TINY})


def test_api_keys_file(tmp_path: Path) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text('[[keys]]\nkey = "sk-file"\nrole = "admin"\n')
    with autoglm.Server(TINY, port=0, device="cpu", api_keys_file=keys) as s:
        with pytest.raises(openai.AuthenticationError):
            client_for(s.url).models.list()
        assert [m.id for m in client_for(s.url, "sk-file").models.list()] == [NAME]
    keys.write_text('[[keys]]\nkey = "sk"\nbogus = 1\n')
    with pytest.raises(autoglm.InvalidRequestError, match="bogus"):
        autoglm.Server(TINY, api_keys_file=keys)
    with pytest.raises(autoglm.ServerError, match="missing.toml") as e:
        autoglm.Server(TINY, api_keys_file=tmp_path / "missing.toml")
    assert e.value.errno == errno.ENOENT


# The console script


def console_script() -> str:
    exe = shutil.which("autoglm", path=str(Path(sys.executable).parent))
    assert exe is not None, "the `autoglm` console script is not installed next to this python"
    return exe


class Served:
    """`autoglm serve ...` in a subprocess; stderr is collected by a thread."""

    def __init__(self, *args: str, cwd: Path | None = None) -> None:
        self.proc = subprocess.Popen(
            [console_script(), "serve", "--device", "cpu", *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            cwd=cwd,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.put(line)

    def expect(self, pattern: str, timeout: float = 120.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None and self.lines.empty():
                    break
                continue
            self.log.append(line)
            if m := re.search(pattern, line):
                return m
        self.proc.kill()
        raise AssertionError(f"no line matched {pattern!r}; stderr:\n{''.join(self.log)}")

    def stderr(self) -> str:
        while not self.lines.empty():
            self.log.append(self.lines.get())
        return "".join(self.log)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_console_script_serves_and_exits_0_on_signal(sig: signal.Signals, glm4: dict[str, Any]) -> None:
    served = Served(
        "--model", f"tiny={TINY}", "--port", "0", "--api-key", "sk-cli", "--stream-interval", "4"
    )
    try:
        url = served.expect(r"listening on (http://127\.0\.0\.1:\d+)").group(1)
        c = glm4["cases"][1]
        r = client_for(url, "sk-cli").completions.create(
            model="tiny", prompt=c["prompt_token_ids"], max_tokens=24, temperature=0,
            extra_body=GREEDY,
        )
        assert r.choices[0].model_extra is not None
        assert r.choices[0].model_extra["token_ids"] == c["greedy_token_ids"]
        stream = client_for(url, "sk-cli").completions.create(
            model="tiny", prompt=c["prompt_token_ids"], max_tokens=24, temperature=0,
            stream=True, extra_body=GREEDY,
        )
        streamed = [chunk.choices[0].model_extra["token_ids"] for chunk in stream]  # type: ignore[index]
        assert streamed == [[t] for t in c["greedy_token_ids"]]
        t0 = time.monotonic()
        served.proc.send_signal(sig)
        assert served.proc.wait(timeout=30) == 0, served.stderr()
        assert time.monotonic() - t0 < 10
        served.expect(r"autoglm_cli::serve: stopped", timeout=5)
        assert f"{sig.name}: stopping" in served.stderr()
        assert refused(int(url.rsplit(":", 1)[1]))
    finally:
        served.kill()


def thread_cores(pid: int) -> dict[str, set[str]]:
    """Thread name -> the `Cpus_allowed_list` values its threads have, from /proc."""
    out: dict[str, set[str]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            status = (task / "status").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        allowed = re.search(r"Cpus_allowed_list:\s*(\S+)", status)
        assert allowed is not None
        out.setdefault(name, set()).add(allowed.group(1))
    return out


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores to pin apart")
def test_console_script_pins_engine_and_http_threads_apart() -> None:
    cores = sorted(os.sched_getaffinity(0))
    engine, http = cores[0], cores[-1]
    served = Served(
        "--model", str(TINY), "--port", "0", "--engine-core", str(engine),
        "--compute-cores", str(engine), "--http-cores", str(http),
    )
    try:
        url = served.expect(r"listening on (http://127\.0\.0\.1:\d+)").group(1)
        r = client_for(url).completions.create(model=NAME, prompt="hi", max_tokens=4)
        assert r.usage is not None and r.usage.completion_tokens == 4
        threads = thread_cores(served.proc.pid)
        assert threads["autoglm-engine"] == {str(engine)}, threads
        assert threads["autoglm-compute"] == {str(engine)}, threads
        assert threads["autoglm-http"] == {str(http)}, threads
        served.proc.send_signal(signal.SIGTERM)
        assert served.proc.wait(timeout=30) == 0, served.stderr()
    finally:
        served.kill()


@pytest.mark.parametrize("no_pin", [False, True])
def test_console_script_keeps_the_engine_loop_apart_by_default(no_pin: bool) -> None:
    cores = sorted(os.sched_getaffinity(0))
    mine = re.search(r"Cpus_allowed_list:\s*(\S+)", Path("/proc/self/status").read_text())
    assert mine is not None
    everywhere = {mine.group(1)}
    served = Served("--model", str(TINY), "--port", "0", *(["--no-pin"] if no_pin else []))
    try:
        url = served.expect(r"listening on (http://127\.0\.0\.1:\d+)").group(1)
        r = client_for(url).completions.create(model=NAME, prompt="hi", max_tokens=4)
        assert r.usage is not None and r.usage.completion_tokens == 4
        threads = thread_cores(served.proc.pid)
        # Compute workers may use every core either way.
        assert threads["autoglm-compute"] == everywhere, threads
        if no_pin or len(cores) < 2:
            assert threads["autoglm-engine"] == everywhere, threads
            assert threads["autoglm-http"] == everywhere, threads
            assert "engine loop on core" not in served.stderr()
        else:
            assert threads["autoglm-engine"] == {str(cores[0])}, threads
            assert str(cores[0]) not in threads["autoglm-http"], threads
            assert f"engine loop on core {cores[0]}" in served.stderr()
    finally:
        served.kill()


def test_console_script_second_signal_forces_the_stop() -> None:
    served = Served("--model", str(TINY), "--port", "0", "--shutdown-grace", "60")
    try:
        port = int(served.expect(r"listening on http://127\.0\.0\.1:(\d+)").group(1))
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(
                b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{"
            )
            time.sleep(0.2)
            served.proc.send_signal(signal.SIGTERM)
            served.expect(r"SIGTERM: stopping", timeout=10)
            # Graceful: the half-sent request holds the stop for up to 60 s.
            with pytest.raises(subprocess.TimeoutExpired):
                served.proc.wait(timeout=1.0)
            t0 = time.monotonic()
            served.proc.send_signal(signal.SIGTERM)
            assert served.proc.wait(timeout=30) == 0, served.stderr()
            assert time.monotonic() - t0 < 10
        assert "closing the remaining connections now" in served.stderr()
    finally:
        served.kill()


def test_console_script_without_model_serves_the_bundled_one(tmp_path: Path) -> None:
    served = Served("--port", "0", cwd=tmp_path)
    try:
        served.expect(r"no model given; serving the bundled tiny GLM-4 model")
        url = served.expect(r"listening on (http://127\.0\.0\.1:\d+)").group(1)
        assert [m.id for m in client_for(url).models.list()] == [NAME]
        served.proc.send_signal(signal.SIGTERM)
        assert served.proc.wait(timeout=30) == 0, served.stderr()
    finally:
        served.kill()


def test_console_script_errors(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    proc = subprocess.run(
        [console_script(), "serve", "--model", str(missing), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "error:" in proc.stderr and str(missing) in proc.stderr
    assert "Traceback" not in proc.stderr

    proc = subprocess.run(
        [console_script(), "serve", "--bogus"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2 and "--bogus" in proc.stderr

    proc = subprocess.run(
        [console_script(), "serve", "--http-cores", "0,x"], capture_output=True, text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "--http-cores" in proc.stderr and "'0,x'" in proc.stderr


def test_cli_port_in_use(capfd: pytest.CaptureFixture[str]) -> None:
    handlers = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert cli.main(["serve", "--model", str(TINY), "--port", str(port), "--device", "cpu"]) == 1
    err = capfd.readouterr().err
    # Found before the model loads (the Rust command writes to the process's stderr).
    assert "already in use" in err and f"127.0.0.1:{port}" in err and "loaded" not in err
    # cli.main() put the signal handlers back.
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers


def test_python_m_autoglm_version() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "autoglm", "--version"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and proc.stdout.strip() == f"autoglm {autoglm.__version__}"
