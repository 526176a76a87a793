"""The autoglm server through the official `openai` Python client, on the glm4-tiny fixture.

Greedy answers (temperature 0, ignore_eos) must equal the fixture's greedy tokens as transformers
computes them; streamed answers must equal non-streamed ones.
"""

from __future__ import annotations

import openai
import pytest

from conftest import MODEL

GREEDY = {"ignore_eos": True, "return_token_ids": True}


def test_models_are_listed(client):
    ids = [m.id for m in client.models.list()]
    assert MODEL in ids
    assert client.models.retrieve(MODEL).id == MODEL


@pytest.mark.parametrize("case", [0, 1, 2])
def test_completion_greedy_tokens_match_the_fixture(client, expected, post, case):
    c = expected["cases"][case]
    r = client.completions.create(
        model=MODEL,
        prompt=c["prompt_token_ids"],
        max_tokens=24,
        temperature=0,
        extra_body=GREEDY,
    )
    choice = r.choices[0]
    assert choice.model_extra["token_ids"] == c["greedy_token_ids"]
    assert choice.finish_reason == "length"
    assert choice.text == post("/detokenize", {"tokens": c["greedy_token_ids"]})["prompt"]
    assert r.usage.prompt_tokens == len(c["prompt_token_ids"])
    assert r.usage.completion_tokens == 24
    assert r.usage.total_tokens == len(c["prompt_token_ids"]) + 24


def test_completion_stream_equals_the_answer(client, expected):
    c = expected["cases"][1]
    args = dict(model=MODEL, prompt=c["prompt_token_ids"], max_tokens=24, temperature=0)
    whole = client.completions.create(**args, extra_body=GREEDY)
    chunks = list(
        client.completions.create(
            **args, stream=True, stream_options={"include_usage": True}, extra_body=GREEDY
        )
    )
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    ids = [t for ch in chunks if ch.choices for t in ch.choices[0].model_extra.get("token_ids", [])]
    assert text == whole.choices[0].text
    assert ids == c["greedy_token_ids"]
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 24


def test_completion_text_prompts(client, post):
    ids = post("/tokenize", {"model": MODEL, "prompt": "Hello"})["tokens"]
    by_text = client.completions.create(
        model=MODEL, prompt=["Hello", "Hello"], max_tokens=8, temperature=0, extra_body=GREEDY
    )
    by_ids = client.completions.create(
        model=MODEL, prompt=ids, max_tokens=8, temperature=0, extra_body=GREEDY
    )
    assert [c.index for c in by_text.choices] == [0, 1]
    assert by_text.choices[0].text == by_text.choices[1].text == by_ids.choices[0].text


@pytest.mark.parametrize("chat", [0, 1])
def test_chat_equals_completion_of_the_rendered_template(client, expected, chat):
    ch = expected["chat"][chat]
    r = client.chat.completions.create(
        model=MODEL, messages=ch["messages"], max_tokens=24, temperature=0, extra_body=GREEDY
    )
    same = client.completions.create(
        model=MODEL, prompt=ch["token_ids"], max_tokens=24, temperature=0, extra_body=GREEDY
    )
    msg = r.choices[0].message
    assert msg.role == "assistant"
    assert msg.content == same.choices[0].text
    assert r.choices[0].model_extra["token_ids"] == same.choices[0].model_extra["token_ids"]
    assert r.usage.prompt_tokens == len(ch["token_ids"])

    stream = client.chat.completions.create(
        model=MODEL,
        messages=ch["messages"],
        max_completion_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == msg.content
    assert chunks[-1].usage.completion_tokens == 24


def test_logprobs(client, expected):
    c = expected["cases"][0]
    r = client.completions.create(
        model=MODEL, prompt=c["prompt_token_ids"], max_tokens=3, temperature=0, logprobs=2,
        extra_body={"ignore_eos": True},
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 3
    assert abs(lp.token_logprobs[0] - c["last_top5_logprobs"][0]) < 1e-3
    assert lp.text_offset[0] == 0

    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0,
        logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True},
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 3
    assert all(len(t.top_logprobs) == 2 for t in content)
    assert content[0].top_logprobs[0].logprob >= content[0].top_logprobs[1].logprob


def test_sampling_options_n_seed_and_stop(client, expected):
    c = expected["cases"][2]
    args = dict(
        model=MODEL, prompt=c["prompt_token_ids"], max_tokens=10, n=3, temperature=0.9, top_p=0.95,
        seed=1234, presence_penalty=0.2, frequency_penalty=0.2,
        extra_body={"ignore_eos": True, "top_k": 40, "min_p": 0.01, "repetition_penalty": 1.05},
    )
    a = client.completions.create(**args)
    b = client.completions.create(**args)
    assert len(a.choices) == 3
    assert [x.text for x in a.choices] == [x.text for x in b.choices]

    greedy = client.completions.create(
        model=MODEL, prompt=c["prompt_token_ids"], max_tokens=24, temperature=0, extra_body=GREEDY
    )
    ids = greedy.choices[0].model_extra["token_ids"]
    stop_id = ids[5]
    r = client.completions.create(
        model=MODEL, prompt=c["prompt_token_ids"], max_tokens=24, temperature=0,
        extra_body={**GREEDY, "stop_token_ids": [stop_id]},
    )
    assert r.choices[0].model_extra["token_ids"] == ids[: ids.index(stop_id) + 1]
    assert r.choices[0].finish_reason == "stop"


def test_errors_map_to_openai_exceptions(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="no-such-model", prompt=[1], max_tokens=1)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=[1], max_tokens=0)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=list(range(10)), max_tokens=5000)
    assert "maximum context length is 4096 tokens" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[], max_tokens=1)
