"""asyncio: generate_async, several concurrent stream_async, cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import random

import pytest

import autoglm
from conftest import greedy, idle, wait_until


async def collect(engine: autoglm.Engine, prompt: list[int], params: autoglm.SamplingParams) -> list[int]:
    ids: list[int] = []
    async for chunk in engine.stream_async(prompt, params):
        assert isinstance(chunk, autoglm.CompletionChunk)
        ids += chunk.token_ids
    return ids


def test_generate_async(engine: autoglm.Engine, glm4: dict) -> None:
    cases = glm4["cases"]

    async def main() -> None:
        one = await engine.generate_async(cases[0]["prompt_token_ids"], greedy())
        assert one.token_ids == cases[0]["greedy_token_ids"]
        many = await engine.generate_async([c["prompt_token_ids"] for c in cases], greedy())
        assert [o.token_ids for o in many] == [c["greedy_token_ids"] for c in cases]
        gathered = await asyncio.gather(
            *(engine.generate_async(c["prompt_token_ids"], greedy()) for c in cases)
        )
        assert [o.token_ids for o in gathered] == [c["greedy_token_ids"] for c in cases]

    asyncio.run(main())


def test_concurrent_stream_async(engine: autoglm.Engine, glm4: dict) -> None:
    cases = glm4["cases"] * 3

    async def main() -> list[list[int]]:
        return await asyncio.gather(*(collect(engine, c["prompt_token_ids"], greedy()) for c in cases))

    got = asyncio.run(main())
    assert got == [c["greedy_token_ids"] for c in cases]


def test_event_loop_is_not_blocked(engine: autoglm.Engine) -> None:
    async def main() -> int:
        ticks = 0
        task = asyncio.ensure_future(engine.generate_async([1, 2, 3], greedy(max_tokens=300)))
        while not task.done():
            ticks += 1
            await asyncio.sleep(0.001)
        await task
        return ticks

    assert asyncio.run(main()) > 5


def test_async_errors_surface_on_await(engine: autoglm.Engine) -> None:
    async def main() -> None:
        fut = engine.generate_async([], greedy())
        with pytest.raises(autoglm.InvalidRequestError, match="empty"):
            await fut
        with pytest.raises(autoglm.InvalidRequestError):
            engine.stream_async([10**6], greedy())

    asyncio.run(main())


def test_breaking_out_of_stream_async_cancels(engine: autoglm.Engine) -> None:
    async def main() -> None:
        n = 0
        stream = engine.stream_async([1, 2, 3], greedy(max_tokens=4000))
        async for _ in stream:
            n += 1
            if n == 3:
                break
        del stream
        gc.collect()

    asyncio.run(main())
    assert wait_until(lambda: idle(engine)), engine.stats()


def test_aclose_and_async_with(engine: autoglm.Engine) -> None:
    async def main() -> None:
        stream = engine.stream_async([1, 2, 3], greedy(max_tokens=4000))
        await stream.__anext__()
        await stream.aclose()
        assert [c async for c in stream] == []

        async with engine.stream_async([4, 5], greedy(max_tokens=4000)) as s:
            await s.__anext__()

        async with contextlib.aclosing(engine.stream_async([6], greedy(max_tokens=4000))) as s2:
            await s2.__anext__()

    asyncio.run(main())
    assert wait_until(lambda: idle(engine)), engine.stats()


def test_cancelling_tasks_cancels_requests(engine: autoglm.Engine) -> None:
    async def consume() -> None:
        async for _ in engine.stream_async([9, 9], greedy(max_tokens=4000)):
            pass

    async def main() -> None:
        gen = asyncio.ensure_future(engine.generate_async([1, 2], greedy(max_tokens=4000)))
        stream = asyncio.ensure_future(consume())
        for _ in range(200):
            if engine.stats().running == 2:
                break
            await asyncio.sleep(0.01)
        assert engine.stats().running == 2
        gen.cancel()
        stream.cancel()
        for task in (gen, stream):
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(main())
    gc.collect()
    assert wait_until(lambda: idle(engine)), engine.stats()


def test_stream_async_survives_cancelled_awaits(engine: autoglm.Engine, glm4: dict) -> None:
    """A timed-out __anext__ neither loses nor reorders the delta it was waiting for."""
    cases = glm4["cases"]

    async def consume(seed: int) -> tuple[list[int], int]:
        rng = random.Random(seed)
        case = cases[seed % len(cases)]
        stream = engine.stream_async(case["prompt_token_ids"], greedy())
        ids: list[int] = []
        timeouts = 0
        while True:
            try:
                # 0 cancels the await at once unless a delta is already there.
                timeout = rng.choice([0, 0.0001, 0.001, 1.0])
                chunk = await asyncio.wait_for(stream.__anext__(), timeout=timeout)
            except asyncio.TimeoutError:
                timeouts += 1
                continue
            except StopAsyncIteration:
                return ids, timeouts
            ids += chunk.token_ids

    async def main() -> list[tuple[list[int], int]]:
        return await asyncio.gather(*(consume(i) for i in range(6)))

    results = asyncio.run(main())
    assert [ids for ids, _ in results] == [cases[i % len(cases)]["greedy_token_ids"] for i in range(6)]
    assert sum(t for _, t in results) > 0


def test_async_needs_a_running_loop(engine: autoglm.Engine) -> None:
    with pytest.raises(RuntimeError):
        engine.generate_async("Hello")
