"""Structured output and tool calls through the official `openai` client, on the random-weight
fixture model: only the grammar can make these outputs valid, so every one must be."""

from __future__ import annotations

import json
import re
from typing import Literal

import openai
import pytest
from pydantic import BaseModel, Field

from conftest import MODEL

MESSAGES = [{"role": "user", "content": "Open the settings app and turn on Wi-Fi."}]


class Step(BaseModel):
    action: Literal["tap", "swipe", "type", "back"]
    x: int = Field(ge=0, le=1080)
    y: int = Field(ge=0, le=2400)
    label: str = Field(max_length=12)
    finished: bool


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "tap",
            "description": "Tap the screen",
            "parameters": {
                "type": "object",
                "properties": {
                    "x": {"type": "integer", "minimum": 0, "maximum": 999},
                    "y": {"type": "integer", "minimum": 0, "maximum": 999},
                },
                "required": ["x", "y"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "launch",
            "parameters": {
                "type": "object",
                "properties": {"app": {"enum": ["Settings", "WeChat", "Maps"]}},
                "required": ["app"],
                "additionalProperties": False,
            },
        },
    },
]


@pytest.mark.parametrize("seed", range(4))
def test_parse_with_a_pydantic_schema_returns_a_valid_object(client, seed):
    r = client.chat.completions.parse(
        model=MODEL, messages=MESSAGES, response_format=Step, seed=seed, temperature=1.0,
        max_tokens=300,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    step = choice.message.parsed
    assert isinstance(step, Step), choice.message.content
    # The same text validates on its own too.
    assert Step.model_validate_json(choice.message.content) == step


def test_json_object_regex_and_choice(client):
    r = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, seed=1, max_tokens=300,
        extra_body={"guided_choice": ["tap", "swipe left", "done"]},
    )
    assert r.choices[0].message.content in ["tap", "swipe left", "done"]
    r = client.completions.create(
        model=MODEL, prompt="Coordinates:", seed=2, max_tokens=40,
        extra_body={"structured_outputs": {"regex": r"\([0-9]{1,3}, [0-9]{1,3}\)"}},
    )
    assert re.fullmatch(r"\([0-9]{1,3}, [0-9]{1,3}\)", r.choices[0].text), r.choices[0].text


def test_tool_choice_required_returns_tool_calls_that_parse(client):
    for seed in range(3):
        r = client.chat.completions.create(
            model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice="required", seed=seed,
            max_tokens=300,
        )
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls", choice.message
        assert choice.message.content is None
        calls = choice.message.tool_calls
        assert calls and all(c.type == "function" for c in calls)
        assert len({c.id for c in calls}) == len(calls)
        for c in calls:
            args = json.loads(c.function.arguments)
            if c.function.name == "tap":
                assert set(args) == {"x", "y"} and all(0 <= args[k] <= 999 for k in args)
            else:
                assert c.function.name == "launch" and args["app"] in ["Settings", "WeChat", "Maps"]


def test_named_tool_choice_calls_that_function(client):
    r = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, tools=TOOLS, seed=5, max_tokens=300,
        tool_choice={"type": "function", "function": {"name": "launch"}},
    )
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "launch"
    assert json.loads(call.function.arguments)["app"] in ["Settings", "WeChat", "Maps"]


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"min_tokens": 5}, "min_tokens"),
        ({"include_stop_str_in_output": True}, "include_stop_str_in_output"),
        ({"prompt_logprobs": 1}, "prompt_logprobs"),
        ({"chat_template_kwargs": {"enable_thinking": True}}, "chat_template_kwargs"),
        ({"continue_final_message": True}, "continue_final_message"),
        ({"guided_regex": "(unclosed"}, None),
        ({"guided_json": {"type": "object"}, "guided_regex": "a"}, "guided_regex"),
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}, "tools": TOOLS},
         "tool_choice"),
    ],
)
def test_fields_not_built_or_malformed_are_a_400_naming_them(client, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4,
                                       extra_body=extra)
    body = e.value.body
    if param is not None:
        assert body["param"] == param, body
    else:
        assert "regex" in body["message"], body


def test_streamed_tool_calls_arrive_as_deltas_that_parse(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice="required", seed=3,
        max_tokens=300, stream=True,
    )
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        for ch in chunk.choices:
            assert not ch.delta.content, "a tool call streams no content"
            for tc in ch.delta.tool_calls or []:
                c = calls.setdefault(tc.index, {"name": "", "arguments": ""})
                if tc.id:
                    c["id"] = tc.id
                if tc.function.name:
                    c["name"] += tc.function.name
                if tc.function.arguments:
                    c["arguments"] += tc.function.arguments
            finish = ch.finish_reason or finish
    assert finish == "tool_calls"
    assert calls
    for c in calls.values():
        assert c["id"] and c["name"] in ("tap", "launch")
        json.loads(c["arguments"])


# The servers of these tests run with --tool-call-parser glm45 --enable-auto-tool-choice. A random
# model never writes a GLM-4.5 tool call by itself, so a regex makes it write one: what the
# parser reads out of it must come back as tool_calls, the text before it as content.
CALL_REGEX = (r"Checking\.\n<tool_call>launch\n<arg_key>app</arg_key>\n"
              r"<arg_value>(Settings|Maps)</arg_value>\n</tool_call>")


def test_auto_tool_choice_reads_glm45_calls_out_of_the_text(client):
    r = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice="auto", seed=1, max_tokens=200,
        extra_body={"guided_regex": CALL_REGEX},
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Checking."
    (call,) = choice.message.tool_calls
    assert call.function.name == "launch"
    assert json.loads(call.function.arguments)["app"] in ("Settings", "Maps")


def test_auto_tool_calls_stream_text_then_the_call(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, tools=TOOLS, seed=2, max_tokens=200, stream=True,
        extra_body={"guided_regex": CALL_REGEX},
    )
    content, args, names, finish = "", "", [], None
    for chunk in stream:
        for ch in chunk.choices:
            content += ch.delta.content or ""
            for tc in ch.delta.tool_calls or []:
                names.append(tc.function.name)
                args += tc.function.arguments or ""
            finish = ch.finish_reason or finish
    # No byte of the call leaks into the streamed content.
    assert content.strip() == "Checking."
    assert names == ["launch"] and finish == "tool_calls"
    assert json.loads(args)["app"] in ("Settings", "Maps")


def test_auto_without_a_call_is_plain_content(client):
    r = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, tools=TOOLS, max_tokens=50,
        extra_body={"guided_choice": ["Sunny <tool", "Rain"]},
    )
    choice = r.choices[0]
    assert choice.finish_reason == "stop" and choice.message.tool_calls is None
    assert choice.message.content in ("Sunny <tool", "Rain")
