"""Streaming, many threads, the GIL, and cancellation."""

from __future__ import annotations

import gc
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import autoglm
from conftest import expected, greedy, idle, wait_until

LONG = 4000  # tokens: far longer than any test waits for


def long_params() -> autoglm.SamplingParams:
    return greedy(max_tokens=LONG)


def test_stream_equals_generate(engines: dict[str, autoglm.Engine], model: str) -> None:
    engine = engines[model]
    for case in expected(model)["cases"]:
        chunks = list(engine.stream(case["prompt_token_ids"], greedy()))
        assert all(isinstance(c, autoglm.CompletionChunk) for c in chunks)
        assert [t for c in chunks for t in c.token_ids] == case["greedy_token_ids"]
        assert all(c.finish_reason is None for c in chunks[:-1])
        assert chunks[-1].finish_reason == "length"
        assert chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == 24
        assert all(c.usage is None for c in chunks[:-1])
        full = engine.generate(case["prompt_token_ids"], greedy())
        assert "".join(c.text for c in chunks) == full.text


def test_stream_with_n_and_text(engine: autoglm.Engine) -> None:
    params = autoglm.SamplingParams(n=2, max_tokens=8, temperature=0.9, seed=11, logprobs=1)
    full = engine.generate("Hello", params)
    stream = engine.stream("Hello", params)
    assert stream.prompt == "Hello"
    assert stream.prompt_token_ids == full.prompt_token_ids
    texts, ids = ["", ""], [[], []]  # type: ignore[var-annotated]
    for c in stream:
        texts[c.index] += c.text
        ids[c.index] += c.token_ids
        assert c.logprobs is not None and len(c.logprobs) == len(c.token_ids)
        assert c.request_id == stream.request_id
    assert ids == [o.token_ids for o in full.outputs]
    assert texts == [o.text for o in full.outputs]
    # Exhausted: stays exhausted.
    assert list(stream) == []


def test_many_threads_at_once(engine: autoglm.Engine, glm4: dict) -> None:
    cases = glm4["cases"]

    def work(i: int) -> bool:
        case = cases[i % len(cases)]
        if i % 2:
            got = [t for c in engine.stream(case["prompt_token_ids"], greedy()) for t in c.token_ids]
        else:
            got = engine.generate(case["prompt_token_ids"], greedy()).token_ids
        return got == case["greedy_token_ids"]

    with ThreadPoolExecutor(max_workers=12) as pool:
        results = list(pool.map(work, range(36)))
    assert all(results)
    assert wait_until(lambda: idle(engine))


def test_gil_is_released_while_waiting(engine: autoglm.Engine) -> None:
    done = threading.Event()

    def run() -> None:
        engine.generate([1, 2, 3], greedy(max_tokens=400))
        done.set()

    t = threading.Thread(target=run)
    t.start()
    spins = 0
    while not done.is_set():
        spins += 1  # pure Python: only runs if the waiting thread let go of the GIL
    t.join()
    assert spins > 10_000


def test_breaking_out_of_a_stream_cancels_and_frees_blocks(engine: autoglm.Engine, glm4: dict) -> None:
    stream = engine.stream([1, 2, 3], long_params())
    for i, _ in enumerate(stream):
        if i == 3:
            break
    assert engine.stats().kv_blocks_used > 0  # still held by the stream object
    del stream
    gc.collect()
    assert wait_until(lambda: idle(engine)), engine.stats()
    generated = engine.stats().generated_tokens
    time.sleep(0.2)
    assert engine.stats().generated_tokens == generated  # nothing is running any more
    # The engine still answers.
    case = glm4["cases"][0]
    assert engine.generate(case["prompt_token_ids"], greedy()).token_ids == case["greedy_token_ids"]


def test_for_loop_break_in_a_function_cancels(engine: autoglm.Engine) -> None:
    def first_chunks() -> int:
        n = 0
        for _ in engine.stream([4, 5, 6], long_params()):
            n += 1
            if n == 2:
                break
        return n  # the stream is unreferenced once the frame returns

    assert first_chunks() == 2
    assert wait_until(lambda: idle(engine)), engine.stats()


def test_cancel_and_close_and_with_block(engine: autoglm.Engine) -> None:
    s = engine.stream([7, 8], long_params())
    next(s)
    s.cancel()
    assert list(s) == []
    assert wait_until(lambda: idle(engine)), engine.stats()
    s.cancel()  # idempotent

    s = engine.stream([7, 8], long_params())
    next(s)
    s.close()
    with pytest.raises(StopIteration):
        next(s)
    assert wait_until(lambda: idle(engine)), engine.stats()

    with engine.stream([7, 8], long_params()) as s:
        next(s)
    assert wait_until(lambda: idle(engine)), engine.stats()


def test_cancel_from_another_thread_wakes_the_waiter(engine: autoglm.Engine) -> None:
    # max_num_seqs=1 keeps the second request waiting in the queue, so its consumer is blocked
    # with nothing to receive: only the cancel can wake it.
    from conftest import FIXTURES

    with autoglm.Engine(FIXTURES / "glm4-tiny", device="cpu", max_num_seqs=1) as e:
        hog = e.stream([1], long_params())
        next(hog)
        queued = e.stream([2], long_params())
        got: list[object] = []
        t = threading.Thread(target=lambda: got.extend(queued))
        t.start()
        time.sleep(0.3)
        assert t.is_alive()
        queued.cancel()
        t.join(timeout=5)
        assert not t.is_alive()
        assert got == []
        hog.cancel()
        assert wait_until(lambda: idle(e)), e.stats()


def test_priority_is_accepted(engine: autoglm.Engine) -> None:
    out = engine.generate([1, 2], greedy(max_tokens=2), priority=-1)
    assert len(out.token_ids) == 2
    assert len(list(engine.stream([1, 2], greedy(max_tokens=2), priority=5))) >= 1


def test_mixed_load_with_cancellations(engine: autoglm.Engine, glm4: dict) -> None:
    """Threads generating, streaming, abandoning and cancelling streams at once."""
    import random

    cases = glm4["cases"]
    wrong: list[str] = []

    def work(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(12):
            case = rng.choice(cases)
            op = rng.randrange(4)
            if op == 0:
                if engine.generate(case["prompt_token_ids"], greedy()).token_ids != case["greedy_token_ids"]:
                    wrong.append("generate")
            elif op == 1:
                got = [t for c in engine.stream(case["prompt_token_ids"], greedy()) for t in c.token_ids]
                if got != case["greedy_token_ids"]:
                    wrong.append("stream")
            elif op == 2:
                for i, _ in enumerate(engine.stream([1, 2], long_params())):
                    if i == rng.randrange(1, 4):
                        break
            else:
                s = engine.stream([3], long_params())
                timer = threading.Timer(rng.random() * 0.05, s.cancel)
                timer.start()
                list(s)
                timer.join()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []
    gc.collect()
    assert wait_until(lambda: idle(engine)), engine.stats()
