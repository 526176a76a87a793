"""The shape of the API: SamplingParams, results, choices, logprobs, stats, lifecycle."""

from __future__ import annotations

import copy
import json

import pytest

import autoglm
from conftest import FIXTURES, greedy


def test_sampling_params_defaults_and_fields() -> None:
    p = autoglm.SamplingParams()
    assert p.to_dict() == {
        "n": 1,
        "max_tokens": 16,
        "temperature": 1.0,
        "top_k": 0,
        "top_p": 1.0,
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "seed": None,
        "stop_token_ids": [],
        "stop": [],
        "ignore_eos": False,
        "logprobs": None,
        "skip_special_tokens": True,
        "structured_outputs": None,
    }
    q = autoglm.SamplingParams(
        n=2,
        max_tokens=5,
        temperature=0.5,
        top_k=3,
        top_p=0.9,
        min_p=0.1,
        repetition_penalty=1.1,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        seed=2**64 - 1,
        stop_token_ids=[1, 2],
        stop="END",
        ignore_eos=True,
        logprobs=3,
        skip_special_tokens=False,
    )
    assert q.stop == ["END"]
    assert q.seed == 2**64 - 1
    assert q.top_p == pytest.approx(0.9)
    assert q.stop_token_ids == [1, 2]
    q.stop = ["a", "b"]
    q.max_tokens = 7
    q.seed = None
    assert (q.stop, q.max_tokens, q.seed) == (["a", "b"], 7, None)
    assert "max_tokens=7" in repr(q)
    assert q == copy.copy(q) == copy.deepcopy(q)
    assert q != p
    assert autoglm.SamplingParams.greedy(max_tokens=3).temperature == 0.0
    r = q.replace(n=1, temperature=0.0)
    assert (r.n, r.temperature, q.n) == (1, 0.0, 2)


def test_sampling_params_assignment_is_validated() -> None:
    p = autoglm.SamplingParams()
    with pytest.raises(autoglm.InvalidRequestError, match="top_p"):
        p.top_p = 1.5
    assert p.top_p == 1.0  # unchanged
    with pytest.raises(autoglm.InvalidRequestError, match="max_tokens"):
        p.max_tokens = -3
    with pytest.raises(autoglm.InvalidRequestError, match="unknown sampling parameter"):
        p.replace(nope=1)
    with pytest.raises(TypeError):
        p.temperature = "hot"  # type: ignore[assignment]


def test_single_prompt_gives_one_result_and_list_gives_list(engine: autoglm.Engine) -> None:
    one = engine.generate("Hello", greedy(max_tokens=3))
    assert isinstance(one, autoglm.RequestOutput)
    assert len(one.outputs) == 1
    assert isinstance(one.outputs[0], autoglm.CompletionOutput)
    assert one.text == one.outputs[0].text
    assert one.token_ids == one.outputs[0].token_ids
    assert one.logprobs is None
    many = engine.generate(["Hello", [1, 2, 3], [{"role": "user", "content": "Hi"}]], greedy(3))
    assert isinstance(many, list) and len(many) == 3
    assert many[0].token_ids == one.token_ids
    assert many[1].prompt_token_ids == [1, 2, 3]
    # A tuple of prompts works like a list.
    assert len(engine.generate(("a", "b"), greedy(2))) == 2
    # Default params: 16 tokens of sampling.
    assert engine.generate([5]).usage.prompt_tokens == 1


def test_chat_is_generate_of_one_conversation(engine: autoglm.Engine) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    got = engine.chat(messages, greedy(4))
    want = engine.generate(messages, greedy(4))
    assert isinstance(got, autoglm.RequestOutput)
    assert got.token_ids == want.token_ids and len(got.token_ids) == 4
    assert got.prompt_token_ids == want.prompt_token_ids
    with pytest.raises(TypeError, match="list of message dicts"):
        engine.chat("Hi")  # type: ignore[arg-type]


def test_params_per_prompt(engine: autoglm.Engine) -> None:
    outs = engine.generate(["a", "b"], [greedy(max_tokens=2), greedy(max_tokens=5)])
    assert [len(o.token_ids) for o in outs] == [2, 5]
    with pytest.raises(autoglm.InvalidRequestError, match="2 prompts"):
        engine.generate(["a", "b"], [greedy()])
    with pytest.raises(TypeError, match="SamplingParams"):
        engine.generate("a", {"max_tokens": 2})  # type: ignore[call-overload]


def test_n_choices_and_logprobs(engine: autoglm.Engine) -> None:
    params = autoglm.SamplingParams(n=3, max_tokens=6, temperature=1.0, seed=7, logprobs=2)
    out = engine.generate("Hello", params)
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert out.usage.completion_tokens == 18
    for c in out.outputs:
        assert len(c.token_ids) == 6
        assert c.finish_reason == "length"
        assert c.logprobs is not None and len(c.logprobs) == 6
        for tok, lp in zip(c.token_ids, c.logprobs):
            assert isinstance(lp, autoglm.TokenLogprobs)
            assert lp.token_id == tok
            assert lp.logprob <= 0.0
            assert len(lp.top) == 2
            assert lp.top[0][1] >= lp.top[1][1]
    # Seeded sampling is reproducible.
    again = engine.generate("Hello", params)
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]


def test_greedy_logprobs_top1_is_the_chosen_token(engine: autoglm.Engine) -> None:
    out = engine.generate([277], greedy(max_tokens=4, logprobs=1))
    assert out.logprobs is not None
    assert [lp.top[0][0] for lp in out.logprobs] == out.token_ids


def test_stop_token_ids_and_max_tokens(engine: autoglm.Engine, glm4: dict) -> None:
    case = glm4["cases"][0]
    stop_at = case["greedy_token_ids"][6]  # first token that differs from the run before it
    out = engine.generate(case["prompt_token_ids"], greedy(stop_token_ids=[stop_at]))
    assert out.finish_reason == "stop"
    assert out.token_ids == case["greedy_token_ids"][:7]


def test_stats(engine: autoglm.Engine) -> None:
    before = engine.stats()
    engine.generate([1, 2, 3], greedy(max_tokens=4))
    after = engine.stats()
    assert isinstance(after, autoglm.EngineStats)
    assert after.generated_tokens >= before.generated_tokens + 4
    assert after.steps > before.steps
    assert after.kv_blocks_total > 0
    assert after.kv_blocks_used == 0
    assert "kv_blocks_used=0" in repr(after)


def test_engine_options() -> None:
    with autoglm.Engine(
        FIXTURES / "glm4-tiny",
        device="cpu",
        block_size=8,
        num_blocks=64,
        max_num_seqs=4,
        max_num_batched_tokens=256,
        max_model_len=128,
        enable_prefix_caching=False,
        num_threads=1,
        seed=3,
    ) as e:
        assert e.max_model_len == 128
        assert e.stats().kv_blocks_total == 64
        out = e.generate([277], greedy())
        assert len(out.token_ids) == 24
    with autoglm.Engine(str(FIXTURES / "glm4-tiny"), device="cpu", kv_cache_mb=1) as e:
        assert e.stats().kv_blocks_total > 0


def test_close_and_context_manager() -> None:
    e = autoglm.Engine(FIXTURES / "glm4-tiny", device="cpu")
    with e as same:
        assert same is e
        assert not e.closed
    assert e.closed
    e.close()  # idempotent
    with pytest.raises(autoglm.EngineShutdownError):
        e.generate("Hello")
    with pytest.raises(autoglm.EngineShutdownError):
        e.stream("Hello")
    with pytest.raises(autoglm.EngineShutdownError):
        e.stats()
    # The tokenizer outlives the engine thread.
    assert e.tokenizer.encode("Hello")


def test_structured_outputs_constrain_the_text(engine: autoglm.Engine) -> None:
    schema = {
        "type": "object",
        "properties": {"action": {"enum": ["tap", "back"]}, "x": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["action", "x"],
        "additionalProperties": False,
    }
    p = autoglm.SamplingParams(max_tokens=200, seed=3, structured_outputs={"json": schema})
    assert p.structured_outputs == {"json": schema}
    assert p.to_dict()["structured_outputs"] == {"json": schema}
    for seed in range(3):
        out = engine.generate("Tap the icon.", p.replace(seed=seed))
        v = json.loads(out.outputs[0].text)
        assert v["action"] in ("tap", "back") and 0 <= v["x"] <= 99
    out = engine.generate("Yes or no?", autoglm.SamplingParams(max_tokens=20, structured_outputs={"choice": ["yes", "no"]}))
    assert out.outputs[0].text in ("yes", "no")
    q = autoglm.SamplingParams(structured_outputs={"json_object": True})
    assert q.structured_outputs == {"json_object": True}
    q.structured_outputs = None
    assert q.structured_outputs is None


def test_bad_structured_outputs_raise_naming_them(engine: autoglm.Engine) -> None:
    with pytest.raises(autoglm.InvalidRequestError, match="structured_outputs"):
        autoglm.SamplingParams(structured_outputs={"json": {}, "regex": "a"})
    with pytest.raises(autoglm.InvalidRequestError, match="structured_outputs"):
        autoglm.SamplingParams(structured_outputs={"nope": 1})
    with pytest.raises(autoglm.InvalidRequestError, match="regex"):
        engine.generate("x", autoglm.SamplingParams(structured_outputs={"regex": "(unclosed"}))
