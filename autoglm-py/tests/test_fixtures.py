"""Parity with the transformers reference: greedy tokens, chat rendering, tokenizer."""

from __future__ import annotations

import autoglm
from conftest import FIXTURES, expected, greedy


def test_greedy_tokens_match_fixtures(engines: dict[str, autoglm.Engine], model: str) -> None:
    engine = engines[model]
    for case in expected(model)["cases"]:
        out = engine.generate(case["prompt_token_ids"], greedy())
        assert out.token_ids == case["greedy_token_ids"]
        assert out.prompt_token_ids == case["prompt_token_ids"]
        assert out.prompt is None
        assert out.finish_reason == "length"
        assert out.usage.prompt_tokens == len(case["prompt_token_ids"])
        assert out.usage.completion_tokens == 24
        assert out.usage.total_tokens == len(case["prompt_token_ids"]) + 24


def test_batched_greedy_tokens_match_fixtures(
    engines: dict[str, autoglm.Engine], model: str
) -> None:
    cases = expected(model)["cases"]
    outs = engines[model].generate([c["prompt_token_ids"] for c in cases], greedy())
    assert isinstance(outs, list)
    assert [o.token_ids for o in outs] == [c["greedy_token_ids"] for c in cases]
    assert len({o.request_id for o in outs}) == len(cases)


def test_chat_rendering_matches_fixtures(engines: dict[str, autoglm.Engine], model: str) -> None:
    engine = engines[model]
    for chat in expected(model)["chat"]:
        assert engine.apply_chat_template(chat["messages"]) == chat["rendered"]
        assert engine.tokenizer.apply_chat_template(chat["messages"]) == chat["rendered"]
        assert engine.tokenizer.encode(chat["rendered"]) == chat["token_ids"]
        # A list of messages is a chat prompt: rendered, then encoded.
        out = engine.generate(chat["messages"], greedy(max_tokens=2))
        assert out.prompt == chat["rendered"]
        assert out.prompt_token_ids == chat["token_ids"]


def test_tokenizer_matches_fixtures(engines: dict[str, autoglm.Engine], model: str) -> None:
    tok = engines[model].tokenizer
    for case in expected(model)["tokenizer"]:
        assert tok.encode(case["text"]) == case["token_ids"]
        assert tok.decode(case["token_ids"]) == case["decoded"]
        assert "<|user|>" not in tok.decode(case["token_ids"], skip_special_tokens=True)
    assert tok.vocab_size > 0
    assert tok.has_chat_template
    assert set(tok.eos_token_ids) >= {586}
    assert tok.token_to_id("<|user|>") == 593
    assert tok.id_to_token(593) == "<|user|>"
    assert tok.token_to_id("no such token at all") is None
    assert tok.id_to_token(10**9) is None


def test_text_prompt_is_encoded_without_special_tokens(engine: autoglm.Engine) -> None:
    out = engine.generate("Hello world", greedy(max_tokens=1))
    assert out.prompt == "Hello world"
    assert out.prompt_token_ids == expected("glm4-tiny")["tokenizer"][0]["token_ids"]


def test_model_info(engines: dict[str, autoglm.Engine]) -> None:
    e = engines["glm4-tiny"]
    assert e.model_config["architecture"] == "Glm4ForCausalLM"
    assert e.model_config["vocab_size"] == 600
    assert engines["glm-tiny-bf16"].model_config["architecture"] == "GlmForCausalLM"
    assert e.max_model_len == 4096
    assert e.device == "cpu"
    assert e.model_path == str(FIXTURES / "glm4-tiny")
    assert "Glm4ForCausalLM" in repr(e)
