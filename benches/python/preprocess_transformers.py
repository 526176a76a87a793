#!/usr/bin/env python3
"""transformers' Glm4v image processors on the screenshot that `benches/benches/vision.rs` times.

The Rust bench (`cargo bench -p autoglm-benches --bench vision -- preprocess`) writes its
deterministic 1080x2400 RGBA PNG to `target/screenshot-1080x2400.png`; this script times
transformers on the same bytes, from the encoded file to `pixel_values`:

    decode   Image.open(BytesIO(png)) (lazy) + the processor's own load
    rgb      either the processor's convert_to_rgb (alpha composited over white, the default,
             the same pixels as autoglm's decode and vLLM's loader) or, with --rgb convert,
             PIL's .convert("RGB") first as transformers' load_image does (alpha dropped)
    resize   bicubic to smart_resize's size (1092x2408 with AutoGLM-Phone-9B's budget)
    rest     rescale + normalise + patchify to [13416, 1176] f32

Both processors are timed: `Glm4vImageProcessor` (torchvision backend, the default since
transformers 5; `Glm4vImageProcessorFast` before) and the PIL/numpy one (`Glm4vImageProcessorPil`
in 5.x, `Glm4vImageProcessor` in 4.x). Each is timed with torch at 1 thread and at its default
thread count, median of --runs after --warmup calls. While each case runs, the CPU time that
*other* processes used is read from /proc/stat (cores busy minus this process's own CPU time), as
`e2e` does, so noisy figures can be recognised.

The preprocessor config is tests/fixtures/glm4v-tiny's with `size` set to AutoGLM-Phone-9B's
budget (shortest_edge 12544, longest_edge 9633792; docs GLM4V.md section 2.3). The output grid is
checked against autoglm's: image_grid_thw [1, 172, 78], 3354 LLM tokens.

Needs torch, torchvision, transformers and pillow (a venv outside the repo:
`python3 -m venv /work/tfvenv && /work/tfvenv/bin/pip install torch torchvision transformers pillow`).

    /work/tfvenv/bin/python benches/python/preprocess_transformers.py [--png PATH] [--runs 20]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from io import BytesIO
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PNG = ROOT / "target" / "screenshot-1080x2400.png"
DEFAULT_CONFIG = ROOT / "tests" / "fixtures" / "glm4v-tiny"
PHONE_9B_SIZE = {"shortest_edge": 12544, "longest_edge": 9633792}
EXPECTED_GRID = [1, 172, 78]
EXPECTED_TOKENS = 3354


def screenshot_png() -> bytes:
    """The Rust bench's `screenshot()`, pixel for pixel (the PNG bytes may differ: another encoder)."""
    import numpy as np
    from PIL import Image

    w, h = 1080, 2400
    px = np.empty((h, w, 4), dtype=np.uint8)
    state = 0x12345678
    bases = [(250, 250, 250), (30, 120, 220), (240, 240, 245), (20, 20, 20)]
    m = 0xFFFFFFFF
    # Row-major like image's enumerate_pixels_mut; the xorshift state runs over every pixel.
    for y in range(h):
        row = px[y]
        band = bases[(y // 160) % 4]
        text_row = 40 < (y % 160) < 70
        for x in range(w):
            state ^= (state << 13) & m
            state ^= state >> 17
            state ^= (state << 5) & m
            if y < 200:
                c = ((x * 255) // w, (y * 255) // 200, 180)
            elif text_row and (x % 24) < 14 and state % 3 == 0:
                c = (40, 40, 40)
            else:
                c = band
            alpha = 200 if (1900 <= y < 2000 and 200 <= x < 880) else 255
            row[x] = (c[0], c[1], c[2], alpha)
    out = BytesIO()
    Image.fromarray(px, "RGBA").save(out, format="PNG")
    return out.getvalue()


def processors():
    """(label, class) for the torchvision and the PIL processor of this transformers version."""
    import transformers.models.glm4v as g

    if hasattr(g, "Glm4vImageProcessorPil"):  # transformers >= 5
        return [
            ("Glm4vImageProcessor (torchvision)", g.Glm4vImageProcessor),
            ("Glm4vImageProcessorPil (PIL)", g.Glm4vImageProcessorPil),
        ]
    return [  # 4.x
        ("Glm4vImageProcessorFast (torchvision)", g.Glm4vImageProcessorFast),
        ("Glm4vImageProcessor (PIL)", g.Glm4vImageProcessor),
    ]


def busy_jiffies() -> int:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal ...: busy = all - idle - iowait
    return sum(v[:8]) - v[3] - v[4]


def own_cpu() -> float:
    t = os.times()
    return t.user + t.system


def time_case(fn, runs: int, warmup: int):
    for _ in range(warmup):
        fn()
    hz = os.sysconf("SC_CLK_TCK")
    j0, c0, w0 = busy_jiffies(), own_cpu(), time.perf_counter()
    samples = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1e3)
    wall = time.perf_counter() - w0
    other = max(0.0, ((busy_jiffies() - j0) / hz - (own_cpu() - c0)) / wall)
    return {
        "median_ms": statistics.median(samples),
        "min_ms": min(samples),
        "max_ms": max(samples),
        "other_cores": other,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--png", type=Path, default=DEFAULT_PNG,
                    help="the screenshot (default: the one the Rust bench writes; generated if absent)")
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                    help="a directory with preprocessor_config.json (size is overridden)")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", default="1,default",
                    help="comma-separated torch thread counts; 'default' = torch's own")
    ap.add_argument("--rgb", choices=["composite", "convert"], default="composite")
    ap.add_argument("--only", choices=["torchvision", "pil"], default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()

    import numpy as np
    import PIL
    import torch
    import torchvision
    import transformers
    from PIL import Image

    default_threads = torch.get_num_threads()
    if args.png.exists():
        png = args.png.read_bytes()
        source = str(args.png)
    else:
        print(f"{args.png} is absent (run the Rust bench first); generating the same pixels",
              file=sys.stderr)
        png = screenshot_png()
        args.png.parent.mkdir(parents=True, exist_ok=True)
        args.png.write_bytes(png)
        source = f"{args.png} (written by this script)"
    probe = Image.open(BytesIO(png))
    print(f"input: {source}, {len(png)} bytes, {probe.size[0]}x{probe.size[1]} {probe.mode}")
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    print(f"python {platform.python_version()}, torch {torch.__version__}, torchvision "
          f"{torchvision.__version__}, transformers {transformers.__version__}, pillow "
          f"{PIL.__version__}, numpy {np.__version__}")
    print(f"cpu: {cpu}, {os.cpu_count()} logical cpus, torch default threads {default_threads}, "
          f"load {os.getloadavg()}")

    def load(b: bytes):
        img = Image.open(BytesIO(b))
        if args.rgb == "convert":
            img = img.convert("RGB")
        return img

    results = {
        "input": source, "png_bytes": len(png), "rgb": args.rgb, "runs": args.runs,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "torchvision": torchvision.__version__,
                     "transformers": transformers.__version__, "pillow": PIL.__version__,
                     "numpy": np.__version__},
        "cpu": cpu, "cases": [],
    }
    outputs = {}
    threads = [default_threads if t == "default" else int(t) for t in args.threads.split(",")]
    for label, cls in processors():
        kind = "pil" if "PIL" in label else "torchvision"
        if args.only and args.only != kind:
            continue
        proc = cls.from_pretrained(str(args.config), size=PHONE_9B_SIZE)

        def run(proc=proc):
            return proc(images=load(png), return_tensors="pt")

        out = run()
        grid = out["image_grid_thw"].tolist()
        pv = out["pixel_values"]
        tokens = int(out["image_grid_thw"].prod()) // (proc.merge_size ** 2)
        ok = grid == [EXPECTED_GRID] and tokens == EXPECTED_TOKENS and list(pv.shape) == [13416, 1176]
        print(f"\n{label}: size {PHONE_9B_SIZE}, image_grid_thw {grid}, pixel_values "
              f"{list(pv.shape)} {pv.dtype}, {tokens} tokens -> "
              f"{'matches autoglm' if ok else 'DIFFERS from autoglm [1,172,78] / 3354'}")
        outputs[kind] = pv.float().numpy()
        for n in threads:
            torch.set_num_threads(n)
            r = time_case(run, args.runs, args.warmup)
            r.update(processor=label, threads=n, grid=grid, tokens=tokens, matches=ok)
            results["cases"].append(r)
            print(f"  torch threads {n}: median {r['median_ms']:.1f} ms (min {r['min_ms']:.1f}, "
                  f"max {r['max_ms']:.1f}), other processes {r['other_cores']:.2f} cores")
        torch.set_num_threads(default_threads)

    # The torchvision processor's stages one by one, as its code runs them (transformers 5).
    from torchvision.transforms.v2 import functional as tvF
    from transformers.image_transforms import convert_to_rgb

    tv = processors()[0][1].from_pretrained(str(args.config), size=PHONE_9B_SIZE)
    decoded = load(png)
    decoded.load()
    rgb = convert_to_rgb(decoded, return_numpy=True)
    chw = torch.from_numpy(rgb).permute(2, 0, 1).contiguous()
    h, w = 2408, 1092
    bicubic = tvF.InterpolationMode.BICUBIC
    resized = tvF.resize(chw, [h, w], interpolation=bicubic, antialias=True)

    def rest():
        x = tv.rescale_and_normalize(resized.unsqueeze(0), True, tv.rescale_factor, True,
                                     tv.image_mean, tv.image_std)
        return tv.patchify(x, tv.patch_size, tv.merge_size, tv.temporal_patch_size)

    def decode():
        img = load(png)
        img.load()
        return img

    stages = [
        ("PIL decode (Image.open + load)", decode, [1]),
        ("convert_to_rgb (composite over white) to numpy", lambda: convert_to_rgb(
            decoded, return_numpy=True), [1]),
        ("tvF.resize bicubic antialias, uint8 1092x2408", lambda: tvF.resize(
            chw, [h, w], interpolation=bicubic, antialias=True), threads),
        ("rescale_and_normalize + patchify", rest, threads),
    ]
    print("\nstages of the torchvision processor:")
    for name, fn, ns in stages:
        for n in ns:
            torch.set_num_threads(n)
            r = time_case(fn, args.runs, args.warmup)
            r.update(processor=f"stage: {name}", threads=n)
            results["cases"].append(r)
            print(f"  {name}, torch threads {n}: median {r['median_ms']:.1f} ms, other processes "
                  f"{r['other_cores']:.2f} cores")
    torch.set_num_threads(default_threads)

    if len(outputs) == 2:
        d = np.abs(outputs["torchvision"] - outputs["pil"])
        print(f"torchvision vs PIL pixel_values: max |diff| {d.max():.4f}, mean {d.mean():.5f} "
              f"(bicubic kernels differ; normalised units)")
        results["torchvision_vs_pil_max_abs_diff"] = float(d.max())
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
