"""deploy/systemd: the unit checked by systemd-analyze, its ExecStart run as systemd would run
it (this machine has no init system to start it), and the sysctl drop-in."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

from conftest import (
    FIXTURE_MODEL, K8S, SYSTEMD, binary, check_sigterm_drain, serve_env_names,
)
from test_kubernetes import with_filled_keys

UNIT = SYSTEMD / "autoglm.service"
ENV_FILE = SYSTEMD / "autoglm.env"
INSTALLED_BINARY = "/usr/local/bin/autoglm"
INSTALLED_ENV_FILE = "/etc/autoglm/autoglm.env"
# systemd-analyze security's overall exposure, 0..100 (its "1.8" is 18 here): fail above this.
EXPOSURE_THRESHOLD = 25


def unit_settings(text: str) -> dict[str, list[str]]:
    """{Section.Key: [values]} of a unit file (continuation lines joined)."""
    out: dict[str, list[str]] = {}
    section = None
    text = re.sub(r"\\\n", " ", text)
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return out


def env_file(text: str) -> dict[str, str]:
    """An EnvironmentFile= as systemd reads it: KEY=VALUE lines, # and ; comments, values
    optionally in single or double quotes."""
    out = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key.strip()), f"line {n}: {line!r}"
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        out[key.strip()] = value
    return out


def expand(word: str, env: dict[str, str]) -> list[str]:
    """systemd's ExecStart expansion of one word: $VAR splits into words, ${VAR} does not."""
    if re.fullmatch(r"\$[A-Za-z_][A-Za-z0-9_]*", word):
        return env.get(word[1:], "").split()
    return [re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: env.get(m.group(1), ""), word)]


def settings():
    return unit_settings(UNIT.read_text())


def unit_for_analysis(tmp_path: Path) -> Path:
    """The unit with its installed binary path replaced by the built one (verify checks that
    ExecStart's program exists)."""
    text = UNIT.read_text()
    assert f"ExecStart={INSTALLED_BINARY} " in text
    path = tmp_path / "autoglm.service"
    path.write_text(text.replace(f"ExecStart={INSTALLED_BINARY} ", f"ExecStart={binary()} "))
    return path


def analyze(*args) -> subprocess.CompletedProcess:
    exe = shutil.which("systemd-analyze")
    assert exe, "systemd-analyze is missing: .ci/test-kubernetes.sh installs the systemd package"
    return subprocess.run([exe, *args], capture_output=True, text=True)


# ---- systemd-analyze --------------------------------------------------------------------------

def test_systemd_analyze_verify(tmp_path):
    r = analyze("verify", str(unit_for_analysis(tmp_path)))
    # verify exits 0 on unknown keys and bad values, only warning: any output is a failure.
    assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), r.stdout + r.stderr


def test_systemd_analyze_verify_catches_mistakes(tmp_path):
    good = unit_for_analysis(tmp_path).read_text()
    for bad in [good.replace("NoNewPrivileges=yes", "NoNewPrivilege=yes"),
                good.replace("ProtectSystem=strict", "ProtectSystem=stricter"),
                good.replace("LimitNOFILE=65536", "LimitNOFILE=lots")]:
        path = tmp_path / "bad" / "autoglm.service"
        path.parent.mkdir(exist_ok=True)
        path.write_text(bad)
        r = analyze("verify", str(path))
        assert r.returncode != 0 or (r.stdout + r.stderr).strip(), "a broken unit verified clean"


def test_systemd_analyze_security(tmp_path):
    r = analyze("security", "--offline=true", f"--threshold={EXPOSURE_THRESHOLD}",
                str(unit_for_analysis(tmp_path)))
    level = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", r.stdout)
    assert level, r.stdout + r.stderr
    print(f"systemd-analyze security: exposure {level.group(1)}")
    assert r.returncode == 0, f"exposure {level.group(1)} above {EXPOSURE_THRESHOLD / 10}"
    # The threshold bites: the same unit without its hardening fails it.
    bare = tmp_path / "bare" / "autoglm.service"
    bare.parent.mkdir()
    bare.write_text("[Service]\nExecStart=/bin/true\n")
    r = analyze("security", "--offline=true", f"--threshold={EXPOSURE_THRESHOLD}", str(bare))
    assert r.returncode != 0, r.stdout


def test_unit_settings():
    s = settings()
    one = lambda k: s[k][-1]  # noqa: E731
    assert one("Service.User") == "autoglm" != "root"
    assert one("Service.Restart") == "on-failure"
    assert one("Service.KillSignal") == "SIGTERM"
    for k, v in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "PrivateTmp": "yes",
                 "ProtectHome": "yes", "CapabilityBoundingSet": ""}.items():
        assert one(f"Service.{k}") == v, k
    assert one("Service.EnvironmentFile") == INSTALLED_ENV_FILE
    sysusers = (SYSTEMD / "autoglm.sysusers").read_text()
    assert re.search(r"^u autoglm ", sysusers, re.M), "the sysusers file does not create autoglm"
    env = env_file(ENV_FILE.read_text())
    stop = float(one("Service.TimeoutStopSec").rstrip("s"))
    drain = float(env["AUTOGLM_SHUTDOWN_DRAIN_DELAY"])
    grace = float(env["AUTOGLM_SHUTDOWN_GRACE"])
    assert stop >= drain + grace + 10, f"TimeoutStopSec {stop} <= drain {drain} + grace {grace}"
    nofile = int(one("Service.LimitNOFILE"))
    assert nofile >= int(env["AUTOGLM_MAX_CONNECTIONS"]) + 1024, "LimitNOFILE below the cap"
    # The UDS lives in the RuntimeDirectory, the kernel cache in the CacheDirectory.
    assert env["AUTOGLM_UDS"].startswith(f"/run/{one('Service.RuntimeDirectory')}/")
    xdg = dict(e.split("=", 1) for e in s["Service.Environment"])["XDG_CACHE_HOME"]
    assert xdg.startswith(f"/var/cache/{one('Service.CacheDirectory')}")


def test_env_file_names_are_the_servers():
    env = env_file(ENV_FILE.read_text())
    known = serve_env_names()
    unknown = sorted(k for k in env if k.startswith("AUTOGLM_") and k not in known)
    # An unknown AUTOGLM_* variable is silently ignored by the server: a typo does nothing.
    assert not unknown, f"not variables of autoglm serve: {unknown}"
    assert "AUTOGLM_NO_SUCH_FLAG" not in known


# ---- ExecStart, run ---------------------------------------------------------------------------

def test_execstart_serves_and_stops_on_sigterm(tmp_path, start_server, request):
    s = settings()
    (exec_start,) = s["Service.ExecStart"]
    env = {"PATH": "/usr/bin:/bin"}
    for e in s.get("Service.Environment", []):
        for word in shlex.split(e):
            k, _, v = word.partition("=")
            env[k] = v
    env.update(env_file(ENV_FILE.read_text()))
    # What only exists on an installed host, mapped into this checkout and a scratch directory.
    keys = with_filled_keys(K8S / "secrets" / "api-keys.example.toml", tmp_path / "keys.toml")
    # A short directory: a Unix socket's path has at most 107 bytes.
    run_dir = Path(tempfile.mkdtemp(prefix="autoglm-run-"))
    request.addfinalizer(lambda: shutil.rmtree(run_dir, ignore_errors=True))
    uds = run_dir / "autoglm.sock"
    mapped = {
        "AUTOGLM_MODELS": str(FIXTURE_MODEL),
        "AUTOGLM_API_KEYS_FILE": str(tmp_path / "keys.toml"),
        "AUTOGLM_UDS": str(uds),
        "AUTOGLM_PORT": "0",
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
    }
    for k, v in mapped.items():
        assert k in env, f"{k} is no longer set by the unit or its env file: update this test"
        print(f"{k}: {env[k]} -> {v}")
        env[k] = v
    assert env["AUTOGLM_HOST"] in ("127.0.0.1", "0.0.0.0", "::")
    env["AUTOGLM_HOST"] = "127.0.0.1"
    words = [w for word in shlex.split(exec_start) for w in expand(word, env)]
    assert words[0] == INSTALLED_BINARY, words
    argv = [str(binary())] + words[1:]
    print("ExecStart:", shlex.join(argv))
    server = start_server(argv, env)
    server.wait_listening()
    assert server.get("/ready")[0] == 200
    assert server.get("/health")[0] == 200
    assert server.get("/ready", uds=str(uds))[0] == 200, "no answer on AUTOGLM_UDS"
    auth = {"Authorization": f"Bearer {keys['gateway']}"}
    status, body = server.get("/v1/models", auth, uds=str(uds))
    assert status == 200 and f'"{env["AUTOGLM_SERVED_MODEL_NAME"]}"' in body, body
    assert server.get("/v1/models")[0] == 401
    # /metrics needs the admin key here (no AUTOGLM_METRICS_PUBLIC).
    assert server.get("/metrics")[0] == 401
    assert server.get("/metrics", {"Authorization": f"Bearer {keys['ops']}"})[0] == 200
    drain = float(env["AUTOGLM_SHUTDOWN_DRAIN_DELAY"])
    grace = float(env["AUTOGLM_SHUTDOWN_GRACE"])
    stop = float(s["Service.TimeoutStopSec"][-1].rstrip("s"))
    took = check_sigterm_drain(server, drain, grace, stop, auth, uds=str(uds))
    print(f"exited 0 {took:.1f} s after SIGTERM (TimeoutStopSec {stop})")
    assert not uds.exists(), "the Unix socket was left behind"


# ---- sysctl -----------------------------------------------------------------------------------

def sysctl_settings() -> dict[str, str]:
    out = {}
    for n, line in enumerate((SYSTEMD / "99-autoglm.conf").read_text().splitlines(), 1):
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        key, sep, value = line.partition("=")
        assert sep, f"99-autoglm.conf:{n}: {line!r}"
        out[key.strip()] = value.strip()
    return out


def test_sysctl_keys_exist_and_cover_the_backlog():
    conf = sysctl_settings()
    for key, value in conf.items():
        path = Path("/proc/sys") / key.replace(".", "/")
        assert path.exists(), f"{key}: no {path} on this kernel (a typo?)"
        assert all(re.fullmatch(r"\d+", v) for v in value.split()), (key, value)
        # The same number of fields as the kernel's (ip_local_port_range takes two).
        assert len(value.split()) == len(path.read_text().split()), (key, value)
    backlog = int(env_file(ENV_FILE.read_text())["AUTOGLM_BACKLOG"])
    assert int(conf["net.core.somaxconn"]) >= backlog, "somaxconn would cut AUTOGLM_BACKLOG"
    lo, hi = map(int, conf["net.ipv4.ip_local_port_range"].split())
    assert 1024 <= lo < hi <= 65535 and hi - lo >= 28000, (lo, hi)
    # A port in the local range can be taken by an outgoing connection before the server binds.
    port = int(env_file(ENV_FILE.read_text())["AUTOGLM_PORT"])
    assert not lo <= port <= hi, f"AUTOGLM_PORT {port} lies in ip_local_port_range {lo}-{hi}"
