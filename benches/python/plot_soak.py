#!/usr/bin/env python3
"""Plots the samples of `examples/soak.rs`: the server's RSS, open fds and KV-cache blocks in use
(with running and waiting sequences and open connections) over time, one panel each, the end of
warm-up marked.

Needs matplotlib (a venv outside the repo:
`python3 -m venv /work/soakvenv && /work/soakvenv/bin/pip install matplotlib`).

    /work/soakvenv/bin/python benches/python/plot_soak.py docs/soak.csv docs/soak.png [--warmup 60]

The CSV's columns: t_s,rss_mb,fds,kv_used,kv_total,running,waiting,requests_done[,conns]; its
last row is the idle sample taken after the load stopped.
"""

import argparse
import csv

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("csv")
    ap.add_argument("png")
    ap.add_argument("--warmup", type=float, default=60.0, help="seconds of warm-up to mark")
    ap.add_argument("--title", default="autoglm server soak (examples/soak.rs)")
    args = ap.parse_args()

    with open(args.csv, newline="") as f:
        rows = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]
    if not rows:
        raise SystemExit(f"{args.csv}: no samples")
    # The load's samples as lines, the idle one after them as a dot.
    rows, idle = (rows[:-1], rows[-1]) if len(rows) > 1 else (rows, None)
    t = [r["t_s"] for r in rows]

    def dot(ax, key, color):
        if idle is not None:
            ax.plot([idle["t_s"]], [idle[key]], "o", color=color, ms=4)

    fig, axes = plt.subplots(4, 1, figsize=(9, 9), sharex=True, dpi=80)
    rss, fds, kv, rate = axes

    rss.plot(t, [r["rss_mb"] for r in rows], color="tab:blue")
    dot(rss, "rss_mb", "tab:blue")
    rss.set_ylabel("RSS (MB)")
    rss.set_ylim(bottom=0)

    fds.plot(t, [r["fds"] for r in rows], color="tab:orange", label="open fds")
    if "conns" in rows[0]:
        fds.plot(t, [r["conns"] for r in rows], color="tab:gray", lw=0.8, label="open connections")
    dot(fds, "fds", "tab:orange")
    if "conns" in rows[0]:
        dot(fds, "conns", "tab:gray")
    fds.set_ylabel("count")
    fds.set_ylim(bottom=0)
    fds.legend(loc="upper left", fontsize=8)

    kv.plot(t, [r["kv_used"] for r in rows], color="tab:green", label="KV blocks used")
    kv.plot(t, [r["running"] for r in rows], color="tab:purple", lw=0.8, label="running seqs")
    kv.plot(t, [r["waiting"] for r in rows], color="tab:red", lw=0.8, label="waiting seqs")
    dot(kv, "kv_used", "tab:green")
    kv.set_ylabel(f"blocks / seqs (pool {rows[0]['kv_total']:.0f})")
    kv.set_ylim(bottom=0)
    kv.legend(loc="upper left", fontsize=8)

    # Requests finished per second between samples.
    rate_t, rate_v = [], []
    for a, b in zip(rows, rows[1:]):
        dt = b["t_s"] - a["t_s"]
        if dt > 0:
            rate_t.append(b["t_s"])
            rate_v.append((b["requests_done"] - a["requests_done"]) / dt)
    rate.plot(rate_t, rate_v, color="tab:brown")
    rate.set_ylabel("requests/s")
    rate.set_ylim(bottom=0)
    rate.set_xlabel("time (s); dots: idle, after the load stopped")

    for ax in axes:
        ax.axvline(args.warmup, color="black", ls=":", lw=0.8)
        ax.grid(alpha=0.3)
    rss.set_title(args.title)
    fig.tight_layout()
    fig.savefig(args.png)


if __name__ == "__main__":
    main()
