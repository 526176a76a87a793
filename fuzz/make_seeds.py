#!/usr/bin/env python3
"""Writes the seed corpus of the fuzz targets under fuzz/corpus/<target>/ (committed; rerun only
to change the seeds). Needs numpy, safetensors and Pillow. Inputs stay under 64 KiB, the
`-max_len` of fuzz/run.sh."""

import base64
import io
import json
import os
import sys

import numpy as np
from PIL import Image
from safetensors.numpy import save

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(HERE, "..", "tests", "fixtures")
SEP = b"\n--8<--\n"


def put(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    assert len(data) <= 65536, (target, name, len(data))
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def png(w, h, mode="RGB", fmt="PNG", **kw):
    rng = np.random.default_rng(w * 31 + h)
    ch = {"RGB": 3, "RGBA": 4, "L": 1, "LA": 2}[mode]
    a = rng.integers(0, 256, size=(h, w, ch), dtype=np.uint8)
    im = Image.fromarray(a[:, :, 0] if ch == 1 else a, mode)
    b = io.BytesIO()
    im.save(b, fmt, **kw)
    return b.getvalue()


def data_url(b, mime="image/png"):
    return f"data:{mime};base64," + base64.b64encode(b).decode()


def tiny_checkpoint():
    """A GLM-4 checkpoint of hidden size 8 (one layer) in mixed dtypes, and its config."""
    h, heads, kv, hd, inter, vocab = 8, 2, 1, 4, 8, 16
    cfg = json.load(open(os.path.join(FIX, "glm4-tiny", "config.json")))
    cfg.update(hidden_size=h, num_attention_heads=heads, num_key_value_heads=kv, head_dim=hd,
               intermediate_size=inter, vocab_size=vocab, num_hidden_layers=1,
               eos_token_id=[15], pad_token_id=15, max_position_embeddings=64)
    rng = np.random.default_rng(0)
    t = {}

    def w(name, *shape, dtype=np.float32):
        t[name] = (rng.standard_normal(shape) * 0.1).astype(dtype)

    w("model.embed_tokens.weight", vocab, h)
    w("model.norm.weight", h)
    w("lm_head.weight", vocab, h, dtype=np.float16)
    p = "model.layers.0."
    for n in ["input_layernorm", "post_attention_layernorm", "post_mlp_layernorm",
              "post_self_attn_layernorm"]:
        w(p + n + ".weight", h)
    w(p + "mlp.gate_up_proj.weight", 2 * inter, h, dtype=np.float16)
    w(p + "mlp.down_proj.weight", h, inter)
    for n, rows in [("q", heads * hd), ("k", kv * hd), ("v", kv * hd)]:
        w(p + f"self_attn.{n}_proj.weight", rows, h)
        w(p + f"self_attn.{n}_proj.bias", rows)
    w(p + "self_attn.o_proj.weight", h, heads * hd)
    return json.dumps(cfg).encode(), t


def main():
    cfg, tensors = tiny_checkpoint()
    put("checkpoint", "single", cfg + SEP + save(tensors))
    index = {"metadata": {"total_size": 0},
             "weight_map": {k: "a.safetensors" for k in tensors}}
    put("checkpoint", "sharded", cfg + SEP + save(tensors) + SEP + json.dumps(index).encode())

    v = os.path.join(FIX, "glm4v-tiny")
    read = lambda d, f: open(os.path.join(FIX, d, f), "rb").read()
    put("model_configs", "glm4v", SEP.join([read("glm4v-tiny", "config.json"),
        read("glm4v-tiny", "tokenizer_config.json"), read("glm4v-tiny", "generation_config.json"),
        read("glm4v-tiny", "preprocessor_config.json"), read("glm4v-tiny", "chat_template.jinja")]))
    put("model_configs", "glm4", SEP.join([read("glm4-tiny", "config.json"),
        read("glm4-tiny", "tokenizer_config.json"), read("glm4-tiny", "generation_config.json")]))

    small = png(40, 30)
    images = {
        "rgb.png": small, "rgba.png": png(20, 20, "RGBA"), "gray.png": png(17, 9, "L"),
        "la.png": png(9, 17, "LA"), "photo.jpg": png(48, 32, fmt="JPEG", quality=80),
        "gray.jpg": png(33, 20, "L", fmt="JPEG"), "lossy.webp": png(30, 30, fmt="WEBP"),
        "lossless.webp": png(24, 12, "RGBA", fmt="WEBP", lossless=True),
        "icon.jpg": read("glm4v-tiny", "icon.jpg"), "exact.png": read("glm4v-tiny", "exact.png"),
    }
    for n, b in images.items():
        put("image", n, b)

    u = data_url(small)
    text = [{"role": "system", "content": "You are a phone agent."},
            {"role": "user", "content": "Open the settings app."}]
    agent = [{"role": "user", "content": [{"type": "text", "text": "** Screen Info ** {}"},
                                           {"type": "image_url", "image_url": {"url": u}}]}]
    tools = [{"type": "function", "function": {"name": "tap", "description": "Tap a point",
              "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}}]
    chats = {
        "text": {"messages": text, "max_tokens": 8},
        "image": {"model": "glm4v-tiny", "messages": agent, "temperature": 0.0, "max_tokens": 4},
        "image_string": {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": u}, {"type": "text", "text": "what?"}]}]},
        "tools": {"messages": text, "tools": tools, "n": 2, "stop": ["\n", "</answer>"],
                  "logprobs": True, "top_logprobs": 3, "seed": 7, "top_k": 5, "top_p": 0.9},
        "assistant": {"messages": text + [{"role": "assistant", "content": "do(action=\"Tap\")"}],
                      "add_generation_prompt": False, "stream": True,
                      "stream_options": {"include_usage": True}, "cache_salt": "tenant-a"},
        "penalties": {"messages": text, "frequency_penalty": 0.2, "presence_penalty": -0.5,
                      "repetition_penalty": 1.1, "logit_bias": {"5": -100}, "stop_token_ids": [3],
                      "max_completion_tokens": 16, "min_p": 0.1, "ignore_eos": True},
    }
    for n, b in chats.items():
        put("chat_completion", n + ".json", json.dumps(b))
        put("tokenize", n + ".json", json.dumps({"messages": b["messages"],
                                                 "add_generation_prompt": True}))
    comps = {
        "text": {"prompt": "Hello", "max_tokens": 4},
        "list": {"prompt": ["a", "b c"], "n": 2, "logprobs": 2, "echo": False},
        "ids": {"prompt": [1, 2, 3, 599], "max_tokens": 2, "stop": "x", "seed": 1},
        "id_lists": {"prompt": [[1, 2], [3]], "add_special_tokens": False, "best_of": 1},
    }
    for n, b in comps.items():
        put("completion", n + ".json", json.dumps(b))
    put("tokenize", "prompt.json", json.dumps({"prompt": "Hello [gMASK]<sop>",
                                               "add_special_tokens": True,
                                               "return_token_strs": True}))

    hostile = {
        "syntax": [{"role": "user", "content": "{{ 7*7 }} {% for x in range(9) %}{% endfor %}"}],
        "roles": text + [{"role": "tool", "content": "{\"ok\": true}"},
                         {"role": "observation", "content": "done"}],
        "parts": agent,
        "with_tools": {"messages": text, "tools": tools},
        "nested": [{"role": "user", "content": [{"type": "text", "text": "x"}] * 5,
                    "name": {"a": [1, {"b": None}]}}],
    }
    for n, b in hostile.items():
        put("chat_template", n + ".json", json.dumps(b))
    put("chat_template", "plain.txt", "Endoftext <|user|> [gMASK] \u0000 \ud7ff {#")


if __name__ == "__main__":
    sys.exit(main())
