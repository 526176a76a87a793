"""Prefix-aware routing: does an agent's next step land on the replica that holds its KV blocks?

Open-AutoGLM-shaped traffic: N agents, each running M steps; step k sends what
phone_agent/agent.py sends (zai-org/Open-AutoGLM): a long system prompt shared by every agent, the
history (user turns stripped of their screenshots, the assistant's `<think>..</think><answer>..
</answer>` replies) and the new user turn, [image_url (this step's screenshot as a PNG data URL),
text]; streamed, temperature 0, top_p 0.85, frequency_penalty 0.2. The model is glm4v-tiny (random
weights), so the assistant replies sent back are synthetic text of a realistic length, not the
model's output. The screenshots are generated PNGs larger than HAProxy's buffer (as real ~1 MB
screenshots are), so an agent's first step, whose first user message holds its screenshot before
the task text, carries no prefix key (least connections) and every later step does.

Modes, each with fresh replicas and a fresh balancer; each replica computes the system prompt once
before the agents start (a running service has it cached):
  haproxy leastconn    deploy/haproxy/haproxy.cfg with AUTOGLM_NO_PREFIX_HASH: no affinity
  haproxy header       the client sends X-Session-Id (the agent's id): consistent hash on it
  haproxy body         no header; the balancer hashes the first user message (prefix_key.lua)
  nginx leastconn      deploy/nginx/nginx.conf, no header
  nginx header         X-Session-Id: `hash $http_x_session_id consistent`

Hit rate = sum of usage.prompt_tokens_details.cached_tokens / sum of usage.prompt_tokens over
every step, and the same from the replicas' /metrics (vllm:prefix_cache_hits_total /
vllm:prefix_cache_queries_total). Sticky = the share of steps 2..M served by the replica that
served the agent's previous step (3..M for `body`, whose step 1 has no key).

Before that, prefix_key.lua's key is checked on bodies of every shape through a real HAProxy.

Asserted: no request fails; each hinted mode's hit rate beats least connections' by --margin and
its hit rate past the shared prefix (the system prompt: what every replica holds anyway) by
--history-margin; 95% of hinted follow-up steps stay on the previous step's replica.

Usage: prefix_routing.py [--agents 12] [--steps 6] [--think 0.6] [--margin 0.03] [--out FILE]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import pathlib
import random
import sys
import threading
import time
import urllib.request

from PIL import Image

import lb
from lb import log

MODEL = "glm4v-tiny"

SYSTEM_RULES = [
    "Tap only on elements that are visible on the current screen.",
    "If the task needs an app that is not open, launch it first.",
    "Type text only after the input field has focus.",
    "When a dialog asks for permission, allow it unless the task says otherwise.",
    "Scroll to find an element before concluding that it does not exist.",
    "If a page is loading, wait and take a new screenshot.",
    "Never pay, transfer money or delete data without an explicit instruction.",
    "Report what you did when the task is finished.",
    "Use the back button to leave a screen you opened by mistake.",
    "Prefer the search box of an app over browsing its menus.",
]


def system_prompt() -> str:
    """About 1.4k tokens (glm4v-tiny's small vocabulary) of rules and action syntax, the same for
    every agent, as Open-AutoGLM's."""
    lines = ["You are a phone-operating agent. Each turn you get the task, the current screen and "
             "what you did so far. Think step by step inside <think></think>, then give exactly one "
             "action inside <answer></answer>.", "", "Actions:"]
    actions = ["Launch(app)", "Tap(element=[x, y])", "Type(text)", "Swipe(start=[x1, y1], end=[x2, y2])",
               "Back()", "Home()", "Long Press(element=[x, y])", "Double Tap(element=[x, y])", "Wait(duration)",
               "Take_over(message)", "finish(message)"]
    for a in actions:
        lines.append(f"- do(action=\"{a.split('(')[0]}\", ...): {a}; coordinates are 0-999 on both axes.")
    lines.append("")
    lines.append("Rules:")
    for j, rule in enumerate(SYSTEM_RULES):
        lines.append(f"{j + 1}. {rule}")
    return "\n".join(lines)


def screenshot(rng: random.Random, w: int, h: int) -> str:
    """A phone-screen-like PNG: flat bars and a noisy band (so it does not compress to nothing)."""
    img = Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3)))
    for _ in range(8):
        y = rng.randrange(h)
        img.paste(tuple(rng.randrange(256) for _ in range(3)), (0, y, w, min(h, y + rng.randrange(20, 120))))
    band = h // 8
    noise = Image.frombytes("RGB", (w, band), rng.randbytes(w * band * 3))
    img.paste(noise, (0, rng.randrange(h - band)))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def think_text(rng: random.Random, step: int) -> str:
    words = ["the", "screen", "shows", "a", "list", "of", "items", "button", "search", "field", "top",
             "bottom", "settings", "next", "I", "should", "tap", "open", "scroll", "down", "menu"]
    return f"Step {step}: " + " ".join(rng.choice(words) for _ in range(60))


class Agent:
    def __init__(self, idx: int, steps: int, sys_prompt: str, img_size: tuple[int, int], think: float):
        self.idx, self.steps, self.sys_prompt = idx, steps, sys_prompt
        self.think = think
        self.rng = random.Random(1000 + idx)
        self.img_size = img_size
        self.results: list[lb.Result] = []
        self.app = ["Settings", "Maps", "Mail", "Notes", "Calendar", "Photos"][idx % 6]

    def run(self, bal: lb.Balancer, use_header: bool, base_url: str) -> None:
        client = lb.openai_client(base_url, timeout=120)
        headers = {"X-Session-Id": f"agent-{self.idx}"} if use_header else {}
        screen_info = json.dumps({"current_app": self.app})
        task = (f"Agent {self.idx}: in {self.app}, find the entry number {self.idx * 7 + 3} and mark it as "
                f"done, then go back to the home screen.")
        context = [{"role": "system", "content": self.sys_prompt}]
        for step in range(1, self.steps + 1):
            text = f"{task}\n\n{screen_info}" if step == 1 else f"** Screen Info **\n\n{screen_info}"
            context.append({"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": screenshot(self.rng, *self.img_size)}},
                {"type": "text", "text": text}]})
            res = lb.Result(client=self.idx, start=time.monotonic())
            lb.stream_chat(client, bal, res, model=MODEL, messages=context, max_tokens=16, headers=headers,
                           temperature=0.0, top_p=0.85, frequency_penalty=0.2)
            self.results.append(res)
            # As the client does: the answered turn loses its image; the reply is appended.
            context[-1] = {"role": "user", "content": [{"type": "text", "text": text}]}
            action = f'do(action="Tap", element=[{self.rng.randrange(1000)}, {self.rng.randrange(1000)}])'
            context.append({"role": "assistant",
                            "content": f"<think>{think_text(self.rng, step)}</think><answer>{action}</answer>"})
            # The phone carries out the action and a new screenshot is taken.
            time.sleep(self.think * self.rng.uniform(0.5, 1.5))


def run_mode(kind: str, mode: str, args, sys_prompt: str, logdir: pathlib.Path) -> dict:
    reps = lb.start_replicas(MODEL, logdir / f"{kind}-{mode}", 1.0, 5.0)
    try:
        if kind == "haproxy":
            bal = lb.HAProxy(reps, prefix_hash=(mode != "leastconn"))
            for r in reps:
                bal.wait_up(r.name)
        else:
            bal = lb.Nginx(reps)
        try:
            # A running service has the shared system prompt cached everywhere: each replica
            # computes it once, directly, before the agents start (else the first steps that meet
            # a cold replica at once each compute it, a few points of noise on every row).
            for r in reps:
                warm = lb.stream_chat(lb.openai_client(r.url, timeout=120), None, lb.Result(client=-1, start=time.monotonic()),
                                      model=MODEL, messages=[{"role": "system", "content": sys_prompt},
                                                             {"role": "user", "content": "warm-up"}], max_tokens=1)
                if not warm.ok:
                    raise AssertionError(f"warming {r.name}: {warm.error}")
            m0 = [r.metrics() for r in reps]
            agents = [Agent(i, args.steps, sys_prompt, (args.width, args.height), args.think)
                      for i in range(args.agents)]
            threads = [threading.Thread(target=a.run, args=(bal, mode == "header", bal.url)) for a in agents]
            t0 = time.monotonic()
            for t in threads:
                t.start()
            for t in threads:
                t.join(300)
            elapsed = time.monotonic() - t0
            m1 = [r.metrics() for r in reps]
        finally:
            bal.stop()
    finally:
        for r in reps:
            if r.proc.poll() is None:
                r.proc.terminate()
        for r in reps:
            r.proc.wait(30)
    results = [res for a in agents for res in a.results]
    failed = [r for r in results if not r.ok]
    prompt = sum(r.prompt_tokens for r in results)
    cached = sum(r.cached_tokens for r in results)
    first = 3 if mode == "body" else 2
    same = total = 0
    for a in agents:
        for k in range(first, args.steps + 1):
            total += 1
            same += a.results[k - 1].server == a.results[k - 2].server
    # The shared prefix: what a step 1 (the system prompt, then its screenshot) can take from the
    # cache at best; past it, what is cached is the agent's own history.
    shared = max(a.results[0].cached_tokens for a in agents)
    own_prompt = sum(max(0, r.prompt_tokens - shared) for r in results)
    own_cached = sum(max(0, r.cached_tokens - shared) for r in results)
    servers = {}
    for r in results:
        servers[r.server or "?"] = servers.get(r.server or "?", 0) + 1
    hits = sum(b.get("vllm:prefix_cache_hits_total", 0) - a.get("vllm:prefix_cache_hits_total", 0) for a, b in zip(m0, m1))
    queries = sum(b.get("vllm:prefix_cache_queries_total", 0) - a.get("vllm:prefix_cache_queries_total", 0)
                  for a, b in zip(m0, m1))
    row = {"balancer": kind, "mode": mode, "requests": len(results), "failed": len(failed),
           "prompt_tokens": prompt, "cached_tokens": cached, "hit_rate": cached / prompt if prompt else 0.0,
           "shared_prefix": shared, "history_hit_rate": own_cached / own_prompt if own_prompt else 0.0,
           "servers": dict(sorted(servers.items())),
           "metrics_hit_rate": hits / queries if queries else None, "sticky": same / total if total else 0.0,
           "seconds": elapsed, "errors": sorted({r.error for r in failed})[:3]}
    log(f"{kind} {mode}: {json.dumps(row)}")
    return row


# ---------------------------------------------------------------------------------------------
# prefix_key.lua on bodies of every shape, through a real HAProxy


KEY_CFG = """global
    tune.bufsize 65536
    lua-load "{lua}"
defaults
    mode http
    timeout connect 1s
    timeout client 5s
    timeout server 5s
frontend keys
    bind 127.0.0.1:{port}
    option http-buffer-request
    http-request return status 200 content-type text/plain lf-string "[%[lua.autoglm_prefix_key]]"
"""


def key_cases() -> list[tuple[str, bytes, str]]:
    big_image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 200_000}}
    sys_msg = {"role": "system", "content": "You are an agent."}
    task = {"type": "text", "text": "open Maps"}
    enc = lambda o: json.dumps(o, ensure_ascii=False, separators=(",", ":")).encode()  # noqa: E731
    return [
        ("string content", enc({"messages": [sys_msg, {"role": "user", "content": "hello there"}]}), "hello there"),
        ("Open-AutoGLM step 1, small image", enc({"messages": [sys_msg, {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}, task]}]}), "open Maps"),
        ("Open-AutoGLM step 1, image past the buffer", enc({"messages": [sys_msg, {"role": "user", "content": [
            big_image, task]}]}), ""),
        ("Open-AutoGLM step 3, new screenshot past the buffer", enc({"model": "m", "stream": True, "messages": [
            sys_msg, {"role": "user", "content": [task]}, {"role": "assistant", "content": "<think>x</think>"},
            {"role": "user", "content": [{"type": "text", "text": "** Screen Info **"}]},
            {"role": "assistant", "content": "y"}, {"role": "user", "content": [big_image, task]}]}), "open Maps"),
        ("no system message, content before role", enc({"messages": [{"content": "first", "role": "user"},
                                                                     {"role": "user", "content": "second"}]}), "first"),
        ("two text parts", enc({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                          {"type": "text", "text": "b"}]}]}), "a%0Ab"),  # (\n, as lf-string prints it)
        ("escapes kept as sent", json.dumps({"messages": [{"role": "user", "content": "打开 \"地图\""}]}).encode(),
         '\\u6253\\u5f00 \\"\\u5730\\u56fe\\"'),
        ("UTF-8 as sent", enc({"messages": [{"role": "user", "content": "打开地图"}]}), "打开地图"),
        ("pretty-printed", json.dumps({"messages": [{"role": "user", "content": "spaced"}]}, indent=2).encode(), "spaced"),
        ("system prompt past the buffer", enc({"messages": [{"role": "system", "content": "s" * 70_000},
                                                            {"role": "user", "content": "late"}]}), ""),
        ("no user message", enc({"messages": [sys_msg]}), ""),
        ("messages not an array", enc({"messages": "nope"}), ""),
        ("not JSON", b"model=x&messages=y", ""),
        ("user content null", enc({"messages": [{"role": "user", "content": None}]}), ""),
    ]


def check_keys(problems: list[str]) -> int:
    d = lb.workdir("autoglm-keys-")
    port = lb.free_port()
    cfg = d / "keys.cfg"
    cfg.write_text(KEY_CFG.format(lua=lb.DEPLOY / "haproxy" / "prefix_key.lua", port=port))
    lb.give_to_nobody(d)
    proc = lb.spawn([*lb.unprivileged(), "haproxy", "-db", "-f", str(cfg)], d / "haproxy.log")
    try:
        def up():
            try:
                return lb.http_get(f"http://127.0.0.1:{port}/", 1)[0] == 200
            except OSError:
                if proc.poll() is not None:
                    raise AssertionError((d / "haproxy.log").read_text())
                return False
        lb.wait_for("the key-check haproxy", up, 20)
        n = 0
        for name, body, want in key_cases():
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body, method="POST")
            with urllib.request.urlopen(req, timeout=5) as r:
                got = r.read().decode()[1:-1]
            n += 1
            if got != want:
                problems.append(f"prefix key, {name}: got {got[:60]!r}, want {want[:60]!r}")
                log(f"FAIL: prefix key, {name}: got {got[:60]!r}, want {want[:60]!r}")
        return n
    finally:
        proc.terminate()
        proc.wait(10)


def metrics_rate(r: dict) -> str:
    # vllm:prefix_cache_* exist in servers built since they were added (commit 141ff07).
    return "n/a" if r["metrics_hit_rate"] is None else f"{r['metrics_hit_rate']:.1%}"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--agents", type=int, default=12)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--think", type=float, default=0.6, help="mean seconds between an answer and the next step")
    ap.add_argument("--width", type=int, default=360)
    ap.add_argument("--height", type=int, default=800)
    ap.add_argument("--margin", type=float, default=0.03, help="hinted hit rate must beat leastconn's by this")
    ap.add_argument("--history-margin", type=float, default=0.08,
                    help="and its hit rate past the shared prefix by this")
    ap.add_argument("--balancers", default="haproxy,nginx")
    ap.add_argument("--out", type=pathlib.Path)
    args = ap.parse_args()
    t_start = time.monotonic()
    lb.autoglm_binary()
    problems: list[str] = []
    n_keys = check_keys(problems)
    log(f"prefix_key.lua: {n_keys} body shapes checked, {len(problems)} wrong")
    sys_prompt = system_prompt()
    sample = screenshot(random.Random(0), args.width, args.height)
    logdir = lb.workdir("autoglm-prefix-")
    rows = []
    modes = {"haproxy": ["leastconn", "header", "body"], "nginx": ["leastconn", "header"]}
    for kind in args.balancers.split(","):
        for mode in modes[kind]:
            rows.append(run_mode(kind, mode, args, sys_prompt, logdir))
    lb.cleanup()
    for r in rows:
        if r["failed"]:
            problems.append(f"{r['balancer']} {r['mode']}: {r['failed']} requests failed: {r['errors']}")
    by = {(r["balancer"], r["mode"]): r for r in rows}
    for kind in args.balancers.split(","):
        base = by[(kind, "leastconn")]["hit_rate"]
        for mode in modes[kind][1:]:
            r = by[(kind, mode)]
            if r["hit_rate"] < base + args.margin:
                problems.append(f"{kind} {mode}: hit rate {r['hit_rate']:.3f} is not {args.margin} above "
                                f"leastconn's {base:.3f}")
            base_h = by[(kind, "leastconn")]["history_hit_rate"]
            if r["history_hit_rate"] < base_h + args.history_margin:
                problems.append(f"{kind} {mode}: hit rate past the shared prefix {r['history_hit_rate']:.3f} is "
                                f"not {args.history_margin} above leastconn's {base_h:.3f}")
            if r["sticky"] < 0.95:
                problems.append(f"{kind} {mode}: only {r['sticky']:.0%} of follow-up steps on the previous replica")
    elapsed = time.monotonic() - t_start
    lines = [f"Prefix-cache hit rate by routing: {args.agents} Open-AutoGLM-shaped agents x {args.steps} steps "
             f"(glm4v-tiny, system prompt {len(sys_prompt)} characters, one {args.width}x{args.height} PNG "
             f"screenshot per step, {len(sample) // 1024} KiB as a data URL), three replicas (s1 weight 2, "
             f"s2 weight 1, s3 backup), fresh replicas per mode, the system prompt computed once on each first.",
             f"Command: python tests/balancers/prefix_routing.py {' '.join(sys.argv[1:])}; "
             f"{elapsed:.0f}s on {lb.machine()}, nproc {os.cpu_count()}.",
             "", "| balancer | routing | requests | failed | prompt tokens | cached tokens | hit rate "
                 "(usage) | past the shared prefix | hit rate (/metrics) | follow-ups on the previous replica "
                 "| requests by replica |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    names = {"leastconn": "least connections, no hint", "header": "X-Session-Id hash",
             "body": "first-user-message hash (no header)"}
    for r in rows:
        lines.append(f"| {r['balancer']} | {names[r['mode']]} | {r['requests']} | {r['failed']} | {r['prompt_tokens']} | "
                     f"{r['cached_tokens']} | {r['hit_rate']:.1%} | {r['history_hit_rate']:.1%} | {metrics_rate(r)} | "
                     f"{r['sticky']:.0%} | {' '.join(f'{k}:{v}' for k, v in r['servers'].items())} |")
    lines.append("")
    lines.append(f"prefix_key.lua: {n_keys} body shapes checked through HAProxy.")
    return lb.report("\n".join(lines) + "\n", args.out, problems, "prefix routing")


if __name__ == "__main__":
    sys.exit(main())
