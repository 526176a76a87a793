"""What tests/balancers/ shares: autoglm replicas, HAProxy and nginx run from deploy/, and a
streaming chat load through them with the official `openai` client.

Everything listens on 127.0.0.1. Every process started here is registered and stopped on exit
(normal, an exception, SIGTERM or SIGINT); the driver (.ci/test-balancers.sh) also kills this
program's process group if it is itself killed.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import pathlib
import platform
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

try:  # openai 3.x talks through httpx2, older versions through httpx
    import httpx2 as httpx
except ImportError:
    import httpx
import openai

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
FIXTURES = ROOT / "tests" / "fixtures"

T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:7.2f}s] {msg}", flush=True)


def report(text: str, out: pathlib.Path | None, problems: list[str], what: str) -> int:
    """Prints a program's table (and writes it to `out`), then its problems; the exit status."""
    print(text)
    if out:
        out.write_text(text)
    if problems:
        print(f"{len(problems)} problem(s):\n  " + "\n  ".join(problems))
        return 1
    print(f"{what}: all assertions held")
    return 0


def machine() -> str:
    """How the figures' machine is named: $AUTOGLM_MACHINE (e.g. "2-core shared VM"), else the host."""
    return os.environ.get("AUTOGLM_MACHINE") or f"{platform.node() or 'this host'} ({platform.machine()})"


def autoglm_binary() -> pathlib.Path:
    """${AUTOGLM_BIN}, else ${CARGO_TARGET_DIR:-target}/release/autoglm (built by CI's earlier suite)."""
    if os.environ.get("AUTOGLM_BIN"):
        path = pathlib.Path(os.environ["AUTOGLM_BIN"])
    else:
        target = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", "target"))
        if not target.is_absolute():
            target = ROOT / target
        path = target / "release" / "autoglm"
    if not os.access(path, os.X_OK):
        sys.exit(f"no autoglm binary at {path}: build it first (cargo build --release -p autoglm-cli) "
                 "or set AUTOGLM_BIN / CARGO_TARGET_DIR")
    return path


# ---------------------------------------------------------------------------------------------
# Processes


_procs: list[subprocess.Popen] = []
_lock = threading.Lock()


def spawn(args: list[str], logfile: pathlib.Path, **kw) -> subprocess.Popen:
    out = open(logfile, "ab")
    p = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **kw)
    out.close()
    with _lock:
        _procs.append(p)
    return p


def cleanup() -> None:
    with _lock:
        procs = list(_procs)
    for p in procs:
        if p.poll() is None:
            try:
                p.send_signal(signal.SIGCONT)
                p.kill()
            except OSError:
                pass
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


_dirs: list[pathlib.Path] = []


def _on_signal(signum, _frame):
    log(f"signal {signum}: stopping everything")
    cleanup()
    for d in _dirs:
        shutil.rmtree(d, True)
    os._exit(128 + signum)


atexit.register(cleanup)
signal.signal(signal.SIGTERM, _on_signal)
signal.signal(signal.SIGINT, _on_signal)


def workdir(prefix: str) -> pathlib.Path:
    """A temp directory that an unprivileged balancer (nobody) can read."""
    d = pathlib.Path(tempfile.mkdtemp(prefix=prefix))
    d.chmod(0o755)
    if not os.environ.get("AUTOGLM_LB_KEEP"):
        _dirs.append(d)
        atexit.register(shutil.rmtree, d, True)
    return d


def unprivileged() -> list[str]:
    """A command prefix dropping root to nobody (balancers run unprivileged); empty if not root."""
    if os.geteuid() != 0:
        return []
    nobody = pwd.getpwnam("nobody")
    return ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups"]


def give_to_nobody(path: pathlib.Path) -> None:
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        for p in [path, *path.rglob("*")]:
            os.chown(p, nobody.pw_uid, nobody.pw_gid)


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def http_json(method: str, url: str, body: dict | None = None, timeout: float = 60.0) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def wait_for(what: str, cond, timeout: float, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


# ---------------------------------------------------------------------------------------------
# autoglm replicas


class Replica:
    """One `autoglm serve` process; restarts on the port it first got."""

    def __init__(self, name: str, model: str, model_dir: pathlib.Path, logdir: pathlib.Path,
                 drain_delay: float, grace: float, extra: list[str] | None = None):
        self.name, self.model, self.model_dir = name, model, model_dir
        self.log = logdir / f"{name}.log"
        self.drain_delay, self.grace = drain_delay, grace
        self.extra = extra or []
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.addr}"

    def start(self) -> None:
        offset = self.log.stat().st_size if self.log.exists() else 0
        args = [str(autoglm_binary()), "serve", "--host", "127.0.0.1", "--port", str(self.port or 0),
                "--model", f"{self.model}={self.model_dir}",
                # --model-root: the unready phase unloads the model and loads it back by path.
                "--model-root", str(self.model_dir.parent),
                "--shutdown-drain-delay", str(self.drain_delay), "--shutdown-grace", str(self.grace),
                # Behind a balancer every connection comes from its address.
                "--max-connections-per-ip", "10000",
                # Three replicas and the balancer share two cores: no pinning, one thread each.
                "--no-pin", "--threads", "1", "--workers", "1", "--prep-threads", "1",
                "--media-threads", "1", "--encoder-threads", "1",
                "--kv-cache-mb", "96", "--generation-config", "vllm",
                "--disable-log-requests", "--log-stats-interval", "3600", *self.extra]
        self.proc = spawn(args, self.log)
        if self.port is None:
            def port():
                if self.proc.poll() is not None:
                    raise AssertionError(f"{self.name} exited ({self.proc.returncode}); see {self.log}")
                text = self.log.read_bytes()[offset:].decode(errors="replace")
                m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", text)
                return m and int(m.group(1))
            self.port = wait_for(f"{self.name} to listen", port, 60)
        self.wait_ready()

    def ready(self) -> bool:
        try:
            return http_get(self.url + "/ready", 1.0)[0] == 200
        except OSError:
            return False

    def wait_ready(self, timeout: float = 60) -> None:
        def ok():
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited ({self.proc.returncode}); see {self.log}")
            return self.ready()
        wait_for(f"{self.name} /ready", ok, timeout)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def metrics(self) -> dict[str, float]:
        """Sums of the Prometheus samples by metric name (labels dropped)."""
        status, body = http_get(self.url + "/metrics", 5.0)
        out: dict[str, float] = {}
        for line in body.decode().splitlines():
            if line.startswith("#") or not line.strip():
                continue
            name_labels, _, value = line.rpartition(" ")
            name = name_labels.split("{", 1)[0]
            try:
                out[name] = out.get(name, 0.0) + float(value)
            except ValueError:
                pass
        return out


def start_replicas(model: str, logdir: pathlib.Path, drain_delay: float, grace: float,
                   names=("s1", "s2", "s3")) -> list[Replica]:
    model_dir = FIXTURES / model
    logdir.mkdir(parents=True, exist_ok=True)
    reps = [Replica(n, model, model_dir, logdir, drain_delay, grace) for n in names]
    for r in reps:
        r.start()
    return reps


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# Balancers


class Balancer:
    kind = ""
    url = ""

    def server_of(self, headers: httpx.Headers) -> str | None:
        raise NotImplementedError

    def down_times(self) -> dict[str, list[tuple[float, float | None]]]:
        return {}

    def retries_between(self, t0: float, t1: float) -> int:
        raise NotImplementedError

    def stop(self) -> None:
        p = self.proc
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


class HAProxy(Balancer):
    """deploy/haproxy/haproxy.cfg as it is, its addresses and paths from the environment."""

    kind = "haproxy"

    def __init__(self, replicas: list[Replica], prefix_hash: bool = True, tls_cert: pathlib.Path | None = None):
        if not shutil.which("haproxy"):
            sys.exit("haproxy is not installed (apt-get install haproxy)")
        self.replicas = replicas
        self.kind = "haproxy" if prefix_hash else "haproxy-leastconn"
        self.dir = workdir("autoglm-haproxy-")
        for f in ("haproxy.cfg", "prefix_key.lua"):
            shutil.copy(DEPLOY / "haproxy" / f, self.dir / f)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ)
        for i, r in enumerate(replicas, 1):
            env[f"AUTOGLM_BACKEND{i}"] = r.addr
        env["AUTOGLM_HAPROXY_BIND"] = f"127.0.0.1:{self.port}"
        env["AUTOGLM_HAPROXY_DIR"] = str(self.dir)
        env["AUTOGLM_HAPROXY_RUN"] = str(self.dir)
        env.pop("AUTOGLM_NO_PREFIX_HASH", None)
        if not prefix_hash:
            env["AUTOGLM_NO_PREFIX_HASH"] = "1"
        self.tls_url = None
        if tls_cert is not None:
            tls_port = free_port()
            env["AUTOGLM_TLS_CERT"] = str(tls_cert)
            env["AUTOGLM_HAPROXY_TLS_BIND"] = f"127.0.0.1:{tls_port}"
            self.tls_url = f"https://127.0.0.1:{tls_port}"
        give_to_nobody(self.dir)
        self.log = self.dir / "haproxy.log"
        check = subprocess.run(["haproxy", "-c", "-q", "-f", str(self.dir / "haproxy.cfg")], env=env,
                               capture_output=True, text=True)
        if check.returncode != 0:
            raise AssertionError(f"haproxy -c failed:\n{check.stdout}{check.stderr}")
        self.proc = spawn([*unprivileged(), "haproxy", "-db", "-f", str(self.dir / "haproxy.cfg")],
                          self.log, env=env, cwd=self.dir)
        self.sock = self.dir / "admin.sock"
        wait_for("haproxy's admin socket", lambda: self.sock.exists() or self._died(), 20)
        self.names = {r.name: r for r in replicas}
        self.transitions: list[tuple[float, str, str, str]] = []  # (t, backend, server, status)
        self._last: dict[tuple[str, str], str] = {}
        self._stop = threading.Event()
        self._poll()
        self._thread = threading.Thread(target=self._monitor, daemon=True)
        self._thread.start()

    def _died(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"haproxy exited ({self.proc.returncode}):\n{self.log.read_text()}")
        return False

    def command(self, cmd: str) -> str:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(self.sock))
            s.sendall(cmd.encode() + b"\n")
            chunks = []
            while True:
                b = s.recv(65536)
                if not b:
                    break
                chunks.append(b)
        return b"".join(chunks).decode()

    def stats(self) -> list[dict[str, str]]:
        text = self.command("show stat")
        lines = [l for l in text.splitlines() if l]
        header = lines[0].lstrip("# ").split(",")
        return [dict(zip(header, l.split(","))) for l in lines[1:]]

    def _poll(self) -> None:
        now = time.monotonic()
        for row in self.stats():
            if row["svname"] in ("FRONTEND", "BACKEND"):
                continue
            key = (row["pxname"], row["svname"])
            status = row["status"].split(" ")[0]
            if self._last.get(key) != status:
                self._last[key] = status
                self.transitions.append((now, key[0], key[1], status))

    def _monitor(self) -> None:
        while not self._stop.is_set():
            try:
                self._poll()
            except OSError:
                pass
            time.sleep(0.05)

    def status(self, server: str) -> set[str]:
        """Its status in each backend (UP, DOWN, NOLB, MAINT, ...)."""
        return {st for (be, sv), st in self._last.items() if sv == server}

    def wait_up(self, server: str, timeout: float = 20) -> None:
        wait_for(f"haproxy to mark {server} UP", lambda: self.status(server) == {"UP"}, timeout)

    def wait_down(self, server: str, since: float, timeout: float = 20) -> float:
        """Waits until `server` is DOWN in every backend; returns when the last of them went
        DOWN, the first time after `since`."""
        wait_for(f"haproxy to mark {server} DOWN", lambda: self.marked_down_at(server, since), timeout)
        return self.marked_down_at(server, since)

    def marked_down_at(self, server: str, after: float) -> float | None:
        """When `server` was DOWN in every backend, the first time since `after`."""
        state: dict[str, str] = {}
        for t, be, sv, st in list(self.transitions):
            if sv != server:
                continue
            state[be] = st
            if t >= after and len(state) == 2 and all(v == "DOWN" for v in state.values()):
                return t
        return None

    def server_of(self, headers) -> str | None:
        return headers.get("x-autoglm-server")

    def set_state(self, server: str, state: str) -> None:
        """The runtime API: `ready`, `drain` (no new requests) or `maint`, in both backends."""
        for be in ("autoglm", "autoglm_affinity"):
            out = self.command(f"set server {be}/{server} state {state}")
            if out.strip():
                raise AssertionError(f"haproxy: set server {be}/{server} state {state}: {out}")

    def counters(self) -> dict[str, int]:
        """Retries (wretr) and redispatches (wredis) over both backends, and requests per server."""
        out = {"retries": 0, "redispatches": 0}
        for row in self.stats():
            if row["svname"] == "BACKEND":
                out["retries"] += int(row["wretr"] or 0)
                out["redispatches"] += int(row["wredis"] or 0)
            elif row["svname"] not in ("FRONTEND",):
                out[f"req_{row['svname']}"] = out.get(f"req_{row['svname']}", 0) + int(row["stot"] or 0)
        return out

    def stop(self) -> None:
        self._stop.set()
        super().stop()


class Nginx(Balancer):
    """deploy/nginx/nginx.conf rendered (only its ${AUTOGLM_*} names) and run with -p."""

    kind = "nginx"

    def __init__(self, replicas: list[Replica]):
        if not shutil.which("nginx"):
            sys.exit("nginx is not installed (apt-get install nginx)")
        self.replicas = replicas
        self.dir = workdir("autoglm-nginx-")
        for sub in ("logs", "tmp"):
            (self.dir / sub).mkdir()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        values = {f"AUTOGLM_BACKEND{i}": r.addr for i, r in enumerate(replicas, 1)}
        values["AUTOGLM_NGINX_LISTEN"] = f"127.0.0.1:{self.port}"
        text = (DEPLOY / "nginx" / "nginx.conf").read_text()
        self.rendered = re.sub(r"\$\{(AUTOGLM_[A-Z0-9_]+)\}", lambda m: values[m.group(1)], text)
        (self.dir / "nginx.conf").write_text(self.rendered)
        give_to_nobody(self.dir)
        self.log = self.dir / "nginx.log"
        self.access_log = self.dir / "logs" / "access.log"
        base = ["nginx", "-p", str(self.dir), "-c", str(self.dir / "nginx.conf"), "-e", "stderr"]
        check = subprocess.run([*unprivileged(), *base, "-t", "-q"], capture_output=True, text=True)
        if check.returncode != 0:
            raise AssertionError(f"nginx -t failed:\n{check.stdout}{check.stderr}")
        self.proc = spawn([*unprivileged(), *base, "-g", "daemon off;"], self.log)
        wait_for("nginx to listen", self._listening, 20)
        self.by_addr = {r.addr: r.name for r in replicas}

    def set_down(self, names: set[str]) -> None:
        """Marks these replicas `down` in the config and reloads nginx (SIGHUP: new workers with
        the new config; the old ones finish the requests they have)."""
        text = self.rendered
        for r in self.replicas:
            if r.name in names:
                text = re.sub(rf"(server {re.escape(r.addr)} [^;]*);", r"\1 down;", text)
        (self.dir / "nginx.conf").write_text(text)
        check = subprocess.run([*unprivileged(), "nginx", "-p", str(self.dir), "-c", str(self.dir / "nginx.conf"),
                                "-e", "stderr", "-t", "-q"], capture_output=True, text=True)
        if check.returncode != 0:
            raise AssertionError(f"nginx -t failed:\n{check.stderr}")
        self.proc.send_signal(signal.SIGHUP)

    def _listening(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"nginx exited ({self.proc.returncode}):\n{self.log.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def server_of(self, headers) -> str | None:
        addr = headers.get("x-autoglm-upstream")
        if not addr:
            return None
        last = addr.split(",")[-1].strip()
        return self.by_addr.get(last, last)

    def access(self) -> list[dict]:
        """The access log: t (epoch), status, upstream (list of addresses tried)."""
        rows = []
        for line in self.access_log.read_text().splitlines():
            parts = line.split(" ")
            # $upstream_addr lists every address tried: "A, B" (", " between tries of one group).
            m = re.search(r" upstream=(.*) ustatus=", line)
            ups = [a.strip() for a in re.split(r"[,:]\s", m.group(1)) if a.strip()] if m else []
            rows.append({"t": float(parts[0]), "status": int(parts[1]), "uri": parts[3], "upstream": ups,
                         "raw": line})
        return rows

    def counters(self) -> dict[str, int]:
        out = {"retries": 0, "redispatches": 0}
        for row in self.access():
            if row["uri"] != "/v1/chat/completions":
                continue
            ups = [u for u in row["upstream"] if u and u != "-"]
            out["retries"] += max(0, len(ups) - 1)
            if ups:
                name = self.by_addr.get(ups[-1], ups[-1])
                out[f"req_{name}"] = out.get(f"req_{name}", 0) + 1
        return out


# ---------------------------------------------------------------------------------------------
# Load


@dataclasses.dataclass
class Result:
    client: int
    start: float
    end: float = 0.0
    first_byte: float | None = None
    ok: bool = False
    error: str = ""
    server: str | None = None
    tokens: int = 0
    finish: str | None = None
    done: bool = False
    status: int | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    max_tokens: int = 0


def openai_client(base_url: str, timeout: float = 30.0, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0,
                         timeout=httpx.Timeout(timeout, connect=5.0), **kw)


def stream_chat(client: openai.OpenAI, balancer: Balancer | None, res: Result, *, model: str,
                messages: list, max_tokens: int, headers: dict | None = None, **sampling) -> Result:
    """One streamed chat completion, read as raw SSE lines so that [DONE] is seen, not assumed.
    Complete: [DONE], finish_reason `length` and usage.completion_tokens == max_tokens."""
    res.max_tokens = max_tokens
    try:
        with client.chat.completions.with_streaming_response.create(
                model=model, messages=messages, max_tokens=max_tokens, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
                extra_headers=headers or {}, **sampling) as resp:
            res.status = resp.status_code
            if balancer is not None:
                res.server = balancer.server_of(resp.headers)
            for line in resp.iter_lines():
                if res.first_byte is None:
                    res.first_byte = time.monotonic()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    res.done = True
                    break
                obj = json.loads(data)
                if "error" in obj:
                    res.error = f"error event: {obj['error']}"
                    continue
                for ch in obj.get("choices") or []:
                    res.finish = ch.get("finish_reason") or res.finish
                usage = obj.get("usage")
                if usage:
                    res.tokens = usage.get("completion_tokens", 0)
                    res.prompt_tokens = usage.get("prompt_tokens", 0)
                    res.cached_tokens = ((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
        if not res.error:
            if not res.done:
                res.error = "stream ended without [DONE]"
            elif res.finish != "length" or res.tokens != max_tokens:
                res.error = f"incomplete: finish_reason={res.finish} completion_tokens={res.tokens}"
            else:
                res.ok = True
    except openai.APIStatusError as e:
        res.status = e.status_code
        res.error = f"HTTP {e.status_code}"
        if balancer is not None:
            res.server = balancer.server_of(e.response.headers)
    except (openai.APITimeoutError, httpx.TimeoutException) as e:
        res.error = f"timeout: {type(e).__name__}"
    except (openai.APIConnectionError, httpx.HTTPError) as e:
        cause = f" ({type(e.__cause__).__name__}: {e.__cause__})" if e.__cause__ else ""
        res.error = f"{type(e).__name__}: {e}{cause}"
    res.end = time.monotonic()
    return res


class Load:
    """`clients` threads, each sending streamed completions of `max_tokens` tokens back to back;
    the first `long_clients` of them ask for `long_tokens` instead (streams that are still being
    generated when a replica is killed or drained)."""

    def __init__(self, balancer: Balancer, model: str, clients: int = 16, max_tokens: int = 32,
                 pause: float = 0.02, timeout: float = 30.0, base_url: str | None = None,
                 long_clients: int = 0, long_tokens: int = 1024, **client_kw):
        self.balancer, self.model = balancer, model
        self.clients, self.max_tokens, self.pause = clients, max_tokens, pause
        self.long_clients, self.long_tokens = long_clients, long_tokens
        self.timeout = timeout
        self.base_url = base_url or balancer.url
        self.client_kw = client_kw
        self.results: list[Result] = []
        self.pending: dict[int, Result] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def _run(self, i: int) -> None:
        client = openai_client(self.base_url, self.timeout, **self.client_kw)
        tokens = self.long_tokens if i < self.long_clients else self.max_tokens
        n = 0
        while not self._stop.is_set():
            n += 1
            res = Result(client=i, start=time.monotonic())
            with self._lock:
                self.pending[i] = res
            messages = [{"role": "system", "content": "You are a test client."},
                        {"role": "user", "content": f"client {i} request {n}: count to {tokens}."}]
            stream_chat(client, self.balancer, res, model=self.model, messages=messages,
                        max_tokens=tokens, temperature=0)
            with self._lock:
                self.pending.pop(i, None)
                self.results.append(res)
            if self.pause:
                time.sleep(self.pause)

    def streaming_on(self, server: str, min_tokens: int = 0, within: float = 1e9) -> int:
        """Streams of at least `min_tokens` from `server` that began (first byte) at most `within`
        seconds ago and have not ended."""
        now = time.monotonic()
        with self._lock:
            return sum(1 for r in self.pending.values() if r.server == server and r.first_byte is not None
                       and now - r.first_byte <= within and r.max_tokens >= min_tokens
                       and not r.done and not r.end)

    def start(self) -> "Load":
        for i in range(self.clients):
            t = threading.Thread(target=self._run, args=(i,), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self, timeout: float = 40.0) -> list[Result]:
        """Stops sending; waits for the requests in flight (at most `timeout`). A request still
        without an outcome then is lost (hung past its client timeout: must not happen)."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            self.lost = list(self.pending.values())
            return list(self.results)
