#!/usr/bin/env python3
"""transformers as the independent oracle for the CUDA backend on GLM-4-9B-0414's shapes, and its
batch-1 decode speed as a baseline (run by .ci/gpu-check.sh on the GPU machine, which has torch
and transformers but no Rust).

1. Writes a random-weight Glm4ForCausalLM checkpoint with GLM-4-9B-0414's layer shape (hidden 4096,
   32 heads, 2 KV heads, head_dim 128, ffn 13696, vocab 151552) but only --layers layers, saved in
   bf16 with save_pretrained, so the engine reads what transformers writes (config.json and
   safetensors as they come). The reference logits are computed in float32 (TF32 off) on those
   bf16 weights, which widen exactly: the same convention as the fixtures. Written beside it:
   xcheck.json (prompt length, the prompt plus --greedy greedy tokens) and logits.f32 (little-endian
   [len(token_ids), vocab] rows, each position's next-token logits). cuda_fixtures'
   `transformers_logits_of_a_9b_shaped_checkpoint_match` (AUTOGLM_XCHECK_DIR=DIR) compares.
2. With --baseline-layers N (40: the whole 9B): a bf16 model of that depth, random weights on the
   device, greedy `generate` of --new-tokens tokens at batch 1 (eager, dynamic cache: what a plain
   transformers user gets), timed with CUDA synchronization after a warm-up, median of --runs.

    python3 benches/python/xcheck_transformers.py DIR [--layers 4] [--baseline-layers 40] [--json F]
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch
from transformers import Glm4Config, Glm4ForCausalLM

SHAPE = dict(
    vocab_size=151552,
    hidden_size=4096,
    intermediate_size=13696,
    num_attention_heads=32,
    num_key_value_heads=2,
    head_dim=128,
    max_position_embeddings=32768,
    rms_norm_eps=1e-5,
    attention_bias=True,
    tie_word_embeddings=False,
    partial_rotary_factor=0.5,
    rope_theta=10000.0,
    initializer_range=0.02,
    pad_token_id=151329,
    eos_token_id=[151329, 151336, 151338],
)


def config(layers, tiny=False):
    kw = dict(SHAPE, num_hidden_layers=layers)
    if tiny:  # the CPU rehearsal of this script
        kw.update(vocab_size=512, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                  head_dim=16, pad_token_id=0, eos_token_id=[1])
    return Glm4Config(**kw)


def random_model(cfg, device, seed, dtype):
    """Random weights (transformers' own init, biases made non-zero) rounded to bf16 values, held
    in `dtype`: float32 for the reference (bf16 values widen exactly, the rotary tables stay
    float32), bfloat16 for saving and timing."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = Glm4ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.02)
            p.copy_(p.bfloat16().float())
    if dtype != torch.float32:
        model = model.to(dtype)
    return model.eval()


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def write_reference(args, device, report):
    t0 = time.time()
    cfg = config(args.layers, args.tiny)
    model = random_model(cfg, device, args.seed, torch.float32)
    g = torch.Generator().manual_seed(args.seed + 1)
    prompt = torch.randint(0, cfg.vocab_size, (args.prompt_len,), generator=g).tolist()
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(args.greedy):
            logits = model(torch.tensor([tokens], device=device)).logits[0, -1]
            tokens.append(int(logits.argmax()))
        logits = model(torch.tensor([tokens], device=device)).logits[0].float().cpu()
    os.makedirs(args.dir, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(args.dir)
    report["checkpoint_s"] = round(time.time() - t0, 2)
    report["checkpoint_files"] = sorted(os.listdir(args.dir))
    # logits[i] predicts token i+1; the last row is the prediction after the final greedy token.
    logits.numpy().astype("<f4").tofile(os.path.join(args.dir, "logits.f32"))
    top2 = logits.topk(2, dim=-1).values
    meta = {
        "prompt_len": args.prompt_len,
        "token_ids": tokens,
        "vocab_size": cfg.vocab_size,
        "layers": args.layers,
        "top2_margins": (top2[:, 0] - top2[:, 1]).tolist(),
        "max_abs_logit": float(logits.abs().max()),
        "transformers": __import__("transformers").__version__,
        "torch": torch.__version__,
    }
    with open(os.path.join(args.dir, "xcheck.json"), "w") as f:
        json.dump(meta, f)
    report["reference"] = {k: meta[k] for k in ("prompt_len", "layers", "max_abs_logit")}
    report["reference"]["greedy"] = tokens[args.prompt_len:]
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def baseline(args, device, report):
    cfg = config(args.baseline_layers, args.tiny)
    t0 = time.time()
    model = random_model(cfg, device, args.seed + 2, torch.bfloat16)
    sync(device)
    params = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(args.seed + 3)
    ids = torch.randint(0, cfg.vocab_size, (1, args.prompt_len), generator=g).to(device)
    kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
              eos_token_id=None, pad_token_id=cfg.pad_token_id)
    times = []
    with torch.no_grad():
        model.generate(ids, **dict(kw, max_new_tokens=4, min_new_tokens=4))  # warm-up
        for _ in range(args.runs):
            sync(device)
            t = time.perf_counter()
            out = model.generate(ids, **kw)
            sync(device)
            times.append(time.perf_counter() - t)
            assert out.shape[1] == args.prompt_len + args.new_tokens, out.shape
    med = statistics.median(times)
    report["baseline"] = {
        "layers": args.baseline_layers,
        "params": params,
        "setup_s": round(time.time() - t0 - sum(times), 2),
        "new_tokens": args.new_tokens,
        "median_s": med,
        "decode_tok_s_batch1": args.new_tokens / med,
        "runs_s": times,
        "what": "model.generate, greedy, bf16, eager, dynamic cache, batch 1 (prefill of "
                f"{args.prompt_len} tokens included)",
    }
    del model


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dir", help="where the checkpoint, xcheck.json and logits.f32 go")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--greedy", type=int, default=8)
    ap.add_argument("--baseline-layers", type=int, default=0)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the report here")
    ap.add_argument("--tiny", action="store_true", help="a tiny shape, for rehearsing on a CPU")
    args = ap.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.tiny:
        sys.exit("xcheck_transformers: no CUDA device (use --tiny to rehearse on a CPU)")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}
    try:
        write_reference(args, device, report)
        if args.baseline_layers:
            baseline(args, device, report)
    finally:
        text = json.dumps(report, indent=1)
        print(text)
        if args.json:
            with open(args.json, "w") as f:
                f.write(text + "\n")


if __name__ == "__main__":
    main()
