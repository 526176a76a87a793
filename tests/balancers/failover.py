"""Failover through HAProxy and nginx (deploy/haproxy, deploy/nginx) in front of three autoglm
replicas, under streaming chat load from the official `openai` client.

Replicas s1 (weight 2), s2 (weight 1) and s3 (backup) serve tests/fixtures/glm4-tiny on loopback.
Each balancer in turn, as an unprivileged foreground process with its own config in a temp dir
(haproxy: the config as deployed, chat requests hashed on their first user message;
haproxy-leastconn: the same with AUTOGLM_NO_PREFIX_HASH, least connections; nginx: least
connections), gets 16 clients sending streamed completions back to back: 14 of 64 tokens, 2 of
1024 (those are still being generated when a replica is killed or drained). `ignore_eos` gives
every stream a known length; `max_retries=0`: the client hides nothing. A stream is complete with
`data: [DONE]`, finish_reason `length` and usage.completion_tokens equal to max_tokens. Phases:

  steady    no event: nothing fails, s3 (backup) gets nothing; hashed (haproxy), s1 gets more
            than s2 (weights 2:1)
  kill      SIGKILL s1 while a long stream runs on it, then restart it: only requests in flight
            on s1 may fail, each with a clean error (exception or incomplete stream, within the
            client timeout), and the long stream does; none that started after s1 was dead fails
  rolling   SIGTERM s1, s2, s3 in turn (drain: /ready 503, serving on for the drain delay, then the
            grace for open streams), each restarted: nothing fails
  unready   s1's model unloaded (DELETE /admin/models/NAME: /ready 503 and new requests 404 at
            once), then loaded again: with active checks, nothing that started after s1 was marked
            down fails
  maintenance  s1 taken out at the balancer first (HAProxy's runtime API `state drain`; nginx:
            `down` and a reload), its model unloaded and loaded again, s1 put back: nothing fails
  hung      SIGSTOP s1 for a few seconds, then SIGCONT: nothing fails (the client timeout is longer);
            with active checks nothing that started after s1 was marked down waits on it
  backup    SIGTERM s1 and s2 together: s3 takes the load, nothing fails

then (HAProxy) TLS termination with a self-signed certificate. Prints per phase and balancer:
requests sent, completed, failed, retried (the balancer's own: HAProxy's stats, nginx's access
log), lost (no outcome at the end: hung past every timeout); writes them to --out.

Usage: failover.py [--balancers haproxy,haproxy-leastconn,nginx] [--phases steady,kill,...]
                   [--no-tls] [--out docs/balancers-failover.txt]
AUTOGLM_LB_KEEP=1 keeps the temp dirs (replica, haproxy and nginx logs and configs).
"""

from __future__ import annotations

import argparse
import collections
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

try:  # openai 3.x talks through httpx2, older versions through httpx
    import httpx2 as httpx
except ImportError:
    import httpx

import lb
from lb import log

MODEL = "glm4-tiny"
DRAIN = 3.0
GRACE = 10.0
CLIENTS = 16
TOKENS = 64
PAUSE = 0.1
LONG_CLIENTS = 2
LONG_TOKENS = 1024


class Failures(AssertionError):
    pass


def check(cond: bool, msg: str, problems: list[str]) -> None:
    if not cond:
        problems.append(msg)
        log(f"FAIL: {msg}")


def describe(results) -> str:
    kinds = collections.Counter(r.error.split(":")[0] for r in results if not r.ok)
    return ", ".join(f"{k} x{n}" for k, n in kinds.most_common()) or "-"


class Run:
    def __init__(self, bal: lb.Balancer, reps: list[lb.Replica]):
        self.bal, self.reps = bal, reps
        self.by_name = {r.name: r for r in reps}
        self.rows: list[dict] = []
        self.problems: list[str] = []

    def wait_in_rotation(self, name: str) -> None:
        """HAProxy: until its checks mark it UP. nginx has no checks: until fail_timeout (5 s)
        after the last failure has passed, so that it is tried again."""
        if isinstance(self.bal, lb.HAProxy):
            self.bal.wait_up(name)
        else:
            time.sleep(5.5)

    def phase(self, name: str, action, warm: float = 1.0, tail: float = 1.0):
        c0 = self.bal.counters()
        t0 = time.monotonic()
        load = lb.Load(self.bal, MODEL, clients=CLIENTS, max_tokens=TOKENS, pause=PAUSE,
                       long_clients=LONG_CLIENTS, long_tokens=LONG_TOKENS).start()
        self.load = load
        time.sleep(warm)
        info = action() or {}
        time.sleep(tail)
        results = load.stop()
        t1 = time.monotonic()
        c1 = self.bal.counters()
        lost = load.lost
        ok = [r for r in results if r.ok]
        bad = [r for r in results if not r.ok]
        retried = (c1["retries"] - c0["retries"]) + (c1["redispatches"] - c0["redispatches"])
        per_server = collections.Counter(r.server for r in ok)
        row = {"balancer": self.bal.kind, "phase": name, "sent": len(results) + len(lost),
               "completed": len(ok), "failed": len(bad), "retried": retried, "lost": len(lost),
               "servers": dict(sorted((k or "?", v) for k, v in per_server.items())),
               "errors": describe(bad), "seconds": t1 - t0, **info.pop("_row", {})}
        self.rows.append(row)
        durs = sorted(r.end - r.start for r in ok) or [0]
        log(f"{self.bal.kind} {name}: {len(results) / (t1 - t0):.0f} req/s, stream p50 "
            f"{durs[len(durs) // 2] * 1000:.0f}ms p90 {durs[len(durs) * 9 // 10] * 1000:.0f}ms")
        log(f"{self.bal.kind} {name}: sent {row['sent']} completed {row['completed']} failed {row['failed']} "
            f"retried {retried} lost {row['lost']} by server {row['servers']} errors {row['errors']} {info}")
        check(not lost, f"{self.bal.kind} {name}: {len(lost)} requests never ended", self.problems)
        check(not any(r.error.startswith("timeout") for r in bad),
              f"{self.bal.kind} {name}: requests hung until the client timeout", self.problems)
        check(len(ok) > 50, f"{self.bal.kind} {name}: only {len(ok)} requests completed", self.problems)
        return results, info

    # -- phases ------------------------------------------------------------------------------

    def steady(self):
        results, _ = self.phase("steady", lambda: time.sleep(2.5))
        by = collections.Counter(r.server for r in results if r.ok)
        check(all(r.ok for r in results), f"{self.bal.kind} steady: failures {describe(results)}", self.problems)
        check(by.get("s3", 0) == 0, f"{self.bal.kind} steady: the backup s3 got {by.get('s3')} requests", self.problems)
        # Weights 2:1. Consistent hashing gives s1 twice the points on its ring: with these
        # requests' distinct keys, clearly more requests. Least connections weighs *open* requests,
        # and with these short streams a replica mostly has none or one open, where weights barely
        # decide (1.0-1.6 measured): not asserted there, only shown.
        if self.bal.kind == "haproxy":
            check(by.get("s1", 0) >= 1.3 * by.get("s2", 0) > 0,
                  f"{self.bal.kind} steady: weights 2:1 but s1 {by.get('s1')} vs s2 {by.get('s2')}", self.problems)
        self.rows[-1]["note"] = f"s1 (weight 2) {by.get('s1', 0)}, s2 (weight 1) {by.get('s2', 0)}, s3 (backup) {by.get('s3', 0)}"

    def kill(self):
        s1 = self.by_name["s1"]

        def action():
            # Kill while s1 is generating: a long stream from it began within the last 50 ms (its
            # 1024 tokens take the server well over that). A stream that began earlier may be all
            # written, over for the server, while the client still reads what is buffered.
            lb.wait_for("a long stream beginning on s1",
                        lambda: self.load.streaming_on("s1", LONG_TOKENS, within=0.05) >= 1, 30, interval=0.002)
            t_kill = time.monotonic()
            s1.signal(signal.SIGKILL)
            s1.wait_exit(10)
            t_dead = time.monotonic()
            info = {"t_kill": t_kill, "t_dead": t_dead}
            if isinstance(self.bal, lb.HAProxy):
                info["t_down"] = self.bal.wait_down("s1", t_kill)
            time.sleep(1.5)
            s1.start()
            self.wait_in_rotation("s1")
            return info

        results, info = self.phase("kill", action)
        t_kill, t_dead = info["t_kill"], info["t_dead"]
        in_flight = [r for r in results if r.start < t_kill < r.end and r.server in ("s1", None)]
        failed = [r for r in results if not r.ok]
        stray = [r for r in failed if not (r.start < t_dead and r.server in ("s1", None) and r.end > t_kill)]
        check(not stray, f"{self.bal.kind} kill: {len(stray)} failures not in flight on s1 at the kill: "
              f"{[(round(r.start - t_kill, 3), r.server, r.error) for r in stray[:5]]}", self.problems)
        after = [r for r in results if r.start > t_dead and not r.ok]
        check(not after, f"{self.bal.kind} kill: {len(after)} requests started after s1 died failed", self.problems)
        cut = [r for r in in_flight if r.max_tokens == LONG_TOKENS and r.server == "s1"
               and r.first_byte is not None and t_kill - 0.1 <= r.first_byte <= t_kill]
        check(cut and all(not r.ok for r in cut), f"{self.bal.kind} kill: long streams begun on s1 in the "
              f"0.1 s before the kill: {len(cut)}, completed anyway: {sum(r.ok for r in cut)}", self.problems)
        self.rows[-1]["note"] = (f"in flight on s1 at the kill: {len(in_flight)}, of which failed {len(failed)}"
                                 + (f"; marked DOWN {info['t_down'] - t_kill:.2f}s after the kill"
                                    if "t_down" in info else ""))

    def rolling(self):
        downs = {}

        def action():
            for r in self.reps:
                t_term = time.monotonic()
                r.signal(signal.SIGTERM)
                if isinstance(self.bal, lb.HAProxy):
                    downs[r.name] = (t_term, self.bal.wait_down(r.name, t_term, timeout=DRAIN + 5))
                code = r.wait_exit(DRAIN + GRACE + 10)
                if code != 0:
                    self.problems.append(f"{r.name} exited {code} on SIGTERM")
                t_gone = time.monotonic()
                r.start()
                self.wait_in_rotation(r.name)
                downs.setdefault(r.name, (t_term, None))
                downs[r.name] += (t_gone,)
                time.sleep(0.5)

        results, _ = self.phase("rolling", action)
        failed = [r for r in results if not r.ok]
        check(not failed, f"{self.bal.kind} rolling: {len(failed)} failures: {describe(failed)}", self.problems)
        notes = []
        for name, (t_term, t_down, t_gone) in downs.items():
            if t_down is not None:
                check(t_down - t_term < DRAIN, f"{self.bal.kind} rolling: {name} marked DOWN "
                      f"{t_down - t_term:.2f}s after SIGTERM, not within the drain delay {DRAIN}s", self.problems)
                late = [r for r in results if r.server == name and t_down < r.start < t_gone]
                check(not late, f"{self.bal.kind} rolling: {len(late)} requests sent to {name} after it was marked DOWN",
                      self.problems)
                notes.append(f"{name} DOWN {t_down - t_term:.2f}s after SIGTERM")
            else:
                served = [r for r in results if r.server == name and t_term < r.start < t_gone]
                notes.append(f"{name} got {len(served)} new requests while draining")
        self.rows[-1]["note"] = "; ".join(notes)

    def unready(self):
        s1 = self.by_name["s1"]
        info = {}

        def action():
            t_unload = time.monotonic()
            unload = threading.Thread(target=lb.http_json, args=("DELETE", f"{s1.url}/admin/models/{MODEL}"))
            unload.start()
            lb.wait_for("s1 /ready 503", lambda: not s1.ready(), 5)
            info["t_unload"] = t_unload
            if isinstance(self.bal, lb.HAProxy):
                info["t_down"] = self.bal.wait_down("s1", t_unload)
            time.sleep(2.5)
            unload.join(40)
            status, body = lb.http_json("POST", f"{s1.url}/admin/models", {"name": MODEL, "path": MODEL})
            if status not in (200, 201):
                raise AssertionError(f"reloading {MODEL} on s1: {status} {body}")
            s1.wait_ready()
            info["t_back"] = time.monotonic()
            self.wait_in_rotation("s1")

        results, _ = self.phase("unready", action)
        failed = [r for r in results if not r.ok]
        not_404 = [r for r in failed if not (r.status == 404 and r.server in ("s1", None))]
        check(not not_404, f"{self.bal.kind} unready: failures other than s1's 404s: {describe(not_404)}", self.problems)
        if "t_down" in info:
            after = [r for r in failed if r.start > info["t_down"]]
            check(not after, f"{self.bal.kind} unready: {len(after)} requests started after s1 was marked DOWN failed",
                  self.problems)
            self.rows[-1]["note"] = (f"s1 DOWN {info['t_down'] - info['t_unload']:.2f}s after the unload; "
                                     f"{len(failed)} got 404 before that")
        else:
            self.rows[-1]["note"] = (f"nginx never reads /ready: {len(failed)} requests got s1's 404 "
                                     f"for the {info['t_back'] - info['t_unload']:.1f}s it had no model")

    def maintenance(self):
        """The way to take a replica out without stopping it: at the balancer first (HAProxy's
        runtime API `set server ... state drain`; nginx: `down` in the config and a reload), then
        unload and reload its model, then back in."""
        s1 = self.by_name["s1"]
        info = {}

        def action():
            info["t_out"] = time.monotonic()
            if isinstance(self.bal, lb.HAProxy):
                self.bal.set_state("s1", "drain")
            else:
                self.bal.set_down({"s1"})
            # Requests sent before that are let finish: the unload waits for them.
            time.sleep(1.0)
            info["t_unload"] = time.monotonic()
            status, body = lb.http_json("DELETE", f"{s1.url}/admin/models/{MODEL}")
            if status != 200:
                raise AssertionError(f"unloading {MODEL} on s1: {status} {body}")
            time.sleep(1.0)
            status, body = lb.http_json("POST", f"{s1.url}/admin/models", {"name": MODEL, "path": MODEL})
            if status not in (200, 201):
                raise AssertionError(f"reloading {MODEL} on s1: {status} {body}")
            s1.wait_ready()
            info["t_in"] = time.monotonic()
            if isinstance(self.bal, lb.HAProxy):
                self.bal.set_state("s1", "ready")
                self.bal.wait_up("s1")
            else:
                self.bal.set_down(set())
                time.sleep(1.0)

        results, _ = self.phase("maintenance", action)
        failed = [r for r in results if not r.ok]
        check(not failed, f"{self.bal.kind} maintenance: {len(failed)} failures: {describe(failed)}", self.problems)
        # The switch takes effect within a moment (nginx: once its new workers run); at the other
        # end, a client thread may record its start a little before it sends (16 threads, one GIL),
        # so a request "started" just before s1 went back in can have reached it just after.
        late = [r for r in results if r.server == "s1" and info["t_out"] + 0.5 < r.start < info["t_in"] - 0.25]
        check(not late, f"{self.bal.kind} maintenance: {len(late)} requests went to s1 while it was out: "
              f"{[(round(r.start - info['t_out'], 3), round(r.end - info['t_out'], 3), r.max_tokens) for r in late[:5]]}",
              self.problems)
        how = "set server state drain/ready" if isinstance(self.bal, lb.HAProxy) else "down + reload (SIGHUP)"
        self.rows[-1]["note"] = f"s1 out ({how}), model unloaded and loaded again, s1 back in"

    def hung(self):
        s1 = self.by_name["s1"]
        info = {}
        hold = 4.0

        def action():
            t_stop = time.monotonic()
            s1.signal(signal.SIGSTOP)
            info["t_stop"] = t_stop
            if isinstance(self.bal, lb.HAProxy):
                info["t_down"] = self.bal.wait_down("s1", t_stop, timeout=hold + 5)
            time.sleep(max(0.0, t_stop + hold - time.monotonic()))
            s1.signal(signal.SIGCONT)
            info["t_cont"] = time.monotonic()
            self.wait_in_rotation("s1")

        results, _ = self.phase("hung", action)
        failed = [r for r in results if not r.ok]
        check(not failed, f"{self.bal.kind} hung: {len(failed)} failures: {describe(failed)}", self.problems)
        stalled = [r for r in results if r.server == "s1" and r.start < info["t_cont"] and r.end > info["t_stop"] + 1.0
                   and r.end - r.start > 1.0]
        note = f"{len(stalled)} streams stalled on s1 (longest {max((r.end - r.start for r in stalled), default=0):.1f}s)"
        if "t_down" in info:
            late = [r for r in results if r.server == "s1" and info["t_down"] < r.start < info["t_cont"]]
            check(not late, f"{self.bal.kind} hung: {len(late)} requests sent to s1 after it was marked DOWN", self.problems)
            note += f"; s1 DOWN {info['t_down'] - info['t_stop']:.2f}s after SIGSTOP"
        else:
            during = [r for r in results if r.server == "s1" and info["t_stop"] < r.start < info["t_cont"]]
            note += f"; nginx sent s1 {len(during)} new requests while it was stopped"
        self.rows[-1]["note"] = note

    def backup(self):
        pair = [self.by_name["s1"], self.by_name["s2"]]
        info = {}

        def action():
            t_term = time.monotonic()
            for r in pair:
                r.signal(signal.SIGTERM)
            if isinstance(self.bal, lb.HAProxy):
                info["t_down"] = max(self.bal.wait_down(r.name, t_term, timeout=DRAIN + 5) for r in pair)
            for r in pair:
                r.wait_exit(DRAIN + GRACE + 10)
            info["t_gone"] = time.monotonic()
            time.sleep(1.0)
            for r in pair:
                r.start()
            info["t_back"] = time.monotonic()
            for r in pair:
                self.wait_in_rotation(r.name)
            info["t_term"] = t_term

        results, _ = self.phase("backup", action)
        failed = [r for r in results if not r.ok]
        check(not failed, f"{self.bal.kind} backup: {len(failed)} failures: {describe(failed)}", self.problems)
        on_s3 = [r for r in results if r.server == "s3" and r.ok]
        check(len(on_s3) > 10, f"{self.bal.kind} backup: s3 served {len(on_s3)} requests", self.problems)
        if "t_down" in info:
            late = [r for r in results if r.server in ("s1", "s2") and info["t_down"] < r.start < info["t_back"]]
            check(not late, f"{self.bal.kind} backup: {len(late)} requests sent to s1/s2 after both were DOWN",
                  self.problems)
        self.rows[-1]["note"] = f"s3 served {len(on_s3)} while s1 and s2 were out"

    def admin_denied(self):
        for path in ("/admin/models", "/metrics"):
            status, _ = lb.http_get(self.bal.url + path)
            check(status == 403, f"{self.bal.kind}: {path} through the balancer is {status}, not 403", self.problems)


def tls_check(reps, workdir: pathlib.Path, problems: list[str]) -> str:
    """HAProxy terminating TLS with a self-signed certificate (openssl), a few streams through it."""
    key, crt, pem = workdir / "key.pem", workdir / "cert.pem", workdir / "haproxy.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-nodes", "-keyout", str(key), "-out", str(crt), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"], check=True, capture_output=True)
    pem.write_bytes(crt.read_bytes() + key.read_bytes())
    lb.give_to_nobody(workdir)
    bal = lb.HAProxy(reps, tls_cert=pem)
    try:
        for r in reps:
            bal.wait_up(r.name)
        client = lb.openai_client(bal.tls_url, http_client=httpx.Client(verify=str(crt)))
        results = [lb.stream_chat(client, bal, lb.Result(client=0, start=time.monotonic()), model=MODEL,
                                  messages=[{"role": "user", "content": f"tls {i}"}], max_tokens=TOKENS,
                                  temperature=0) for i in range(4)]
        ok = sum(r.ok for r in results)
        check(ok == 4, f"TLS: {ok}/4 streams complete ({describe(results)})", problems)
        # And a client that does not trust the certificate is refused.
        untrusted = lb.stream_chat(lb.openai_client(bal.tls_url), bal, lb.Result(client=0, start=time.monotonic()),
                                   model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=4)
        err = untrusted.error.lower()
        check(not untrusted.ok and ("certificate" in err or "ssl" in err),
              f"TLS: an untrusting client got {untrusted.error or 'through'}", problems)
        return f"TLS at HAProxy (self-signed P-256, verified by the client): {ok}/4 streams complete"
    finally:
        bal.stop()


def table(rows) -> str:
    cols = ["balancer", "phase", "sent", "completed", "failed", "retried", "lost"]
    lines = ["| " + " | ".join(cols) + " | notes |", "|" + "---|" * (len(cols) + 1)]
    for r in rows:
        lines.append("| " + " | ".join(str(r[c]) for c in cols) + f" | {r.get('note', '')} |")
    return "\n".join(lines)


def main() -> int:
    global CLIENTS, TOKENS, PAUSE, LONG_CLIENTS, LONG_TOKENS
    ap = argparse.ArgumentParser()
    ap.add_argument("--balancers", default="haproxy,haproxy-leastconn,nginx")
    ap.add_argument("--out", type=pathlib.Path)
    ap.add_argument("--phases", default="steady,kill,rolling,unready,maintenance,hung,backup")
    ap.add_argument("--no-tls", action="store_true")
    ap.add_argument("--clients", type=int, default=CLIENTS)
    ap.add_argument("--tokens", type=int, default=TOKENS)
    ap.add_argument("--pause", type=float, default=PAUSE)
    ap.add_argument("--long-clients", type=int, default=LONG_CLIENTS)
    ap.add_argument("--long-tokens", type=int, default=LONG_TOKENS)
    args = ap.parse_args()
    CLIENTS, TOKENS, PAUSE = args.clients, args.tokens, args.pause
    LONG_CLIENTS, LONG_TOKENS = args.long_clients, args.long_tokens
    t_start = time.monotonic()
    lb.autoglm_binary()
    logdir = lb.workdir("autoglm-failover-")
    problems: list[str] = []
    rows: list[dict] = []
    extra = []
    reps = lb.start_replicas(MODEL, logdir, DRAIN, GRACE)
    log("replicas: " + ", ".join(f"{r.name}={r.addr}" for r in reps))
    try:
        for kind in args.balancers.split(","):
            if kind == "haproxy":
                bal = lb.HAProxy(reps)
            elif kind == "haproxy-leastconn":
                bal = lb.HAProxy(reps, prefix_hash=False)
            elif kind == "nginx":
                bal = lb.Nginx(reps)
            else:
                sys.exit(f"unknown balancer {kind}")
            log(f"{kind} at {bal.url}")
            try:
                if isinstance(bal, lb.HAProxy):
                    for r in reps:
                        bal.wait_up(r.name)
                run = Run(bal, reps)
                run.admin_denied()
                for phase in args.phases.split(","):
                    getattr(run, phase)()
                rows += run.rows
                problems += run.problems
            finally:
                bal.stop()
        if "haproxy" in args.balancers and not args.no_tls:
            extra.append(tls_check(reps, lb.workdir("autoglm-tls-"), problems))
    except Exception:
        for r in reps:
            sys.stderr.write(f"--- {r.name} log (tail)\n" + r.log.read_text()[-3000:])
        raise
    finally:
        lb.cleanup()
    elapsed = time.monotonic() - t_start
    out = [f"Failover through HAProxy and nginx: {CLIENTS} clients streaming completions back to back "
           f"({CLIENTS - LONG_CLIENTS} of {TOKENS} tokens, {LONG_CLIENTS} of {LONG_TOKENS}; glm4-tiny) through "
           f"three replicas (s1 weight 2, s2 weight 1, s3 backup), drain delay {DRAIN:g}s, grace {GRACE:g}s. "
           "haproxy = deploy/haproxy/haproxy.cfg as deployed (these chat requests hashed on their first user "
           "message); haproxy-leastconn = the same with AUTOGLM_NO_PREFIX_HASH=1; nginx = deploy/nginx/nginx.conf.",
           f"Command: python tests/balancers/failover.py {' '.join(sys.argv[1:])} (as .ci/test-balancers.sh runs it); "
           f"{elapsed:.0f}s on {lb.machine()}, nproc {os.cpu_count()}; "
           f"HAProxy {subprocess.run(['haproxy', '-v'], capture_output=True, text=True).stdout.split()[2]}, "
           f"nginx {subprocess.run(['nginx', '-v'], capture_output=True, text=True).stderr.strip().split('/')[-1]}.",
           "sent = started; completed = [DONE], finish_reason length, all max_tokens tokens; failed = an exception, an HTTP "
           "error or an incomplete stream; retried = the balancer's own retries and redispatches (HAProxy stats "
           "wretr+wredis; nginx access log, upstreams tried beyond the first); lost = no outcome at the end.",
           "", table(rows), "", *extra]
    return lb.report("\n".join(out) + "\n", args.out, problems, "failover")


if __name__ == "__main__":
    sys.exit(main())
