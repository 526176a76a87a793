"""Quick start for the autoglm Python bindings.

    pip install ./autoglm-py
    python examples/python/quickstart.py [MODEL_DIR]

MODEL_DIR defaults to the tiny bundled model (random weights: the text is gibberish, but every
call below works the same on a real GLM-4 checkpoint).
"""

import asyncio
import sys
from pathlib import Path

import autoglm

REPO = Path(__file__).resolve().parents[2]
model = sys.argv[1] if len(sys.argv) > 1 else str(REPO / "tests" / "fixtures" / "glm4-tiny")

with autoglm.Engine(model, device="cpu") as engine:
    params = autoglm.SamplingParams(max_tokens=16, temperature=0.0)

    # One prompt: text, token ids, or chat messages rendered through the model's template.
    out = engine.generate([{"role": "user", "content": "Hello"}], params)
    print("chat     :", repr(out.text), out.finish_reason, out.usage)

    # Many prompts at once are batched by the engine; one result per prompt.
    for o in engine.generate(["Hello", "What is GLM?", [1, 2, 3]], params):
        print("batch    :", o.prompt_token_ids[:6], "->", o.token_ids[:6])

    # Several sampled choices per prompt (n), with logprobs.
    sampled = engine.generate("Hello", params.replace(n=2, temperature=0.8, seed=0, logprobs=2))
    for c in sampled.outputs:
        print(f"choice {c.index} :", repr(c.text), c.logprobs[0].top if c.logprobs else None)

    # Streaming: an iterator of deltas; breaking out cancels the request.
    print("stream   : ", end="")
    for chunk in engine.stream("Hello", params):
        print(chunk.text, end="", flush=True)
    print()

    # asyncio: awaitable results and async iterators.
    async def main() -> None:
        results = await asyncio.gather(*(engine.generate_async(p, params) for p in ["a", "b"]))
        print("async    :", [r.usage.completion_tokens for r in results])
        async for chunk in engine.stream_async("Hello", params):
            if chunk.usage:
                print("async end:", chunk.finish_reason, chunk.usage)

    asyncio.run(main())

    tok = engine.tokenizer
    ids = tok.encode("Hello world")
    print("tokenizer:", ids, repr(tok.decode(ids)))
    print("stats    :", engine.stats())
