"""Images through the autoglm server with the official `openai` client, on the glm4v-tiny fixture.

Two servers (started by .ci/test-server.sh): AUTOGLM_SERVER_URL serves `glm4v-tiny` with the
default content format `string` (what Open-AutoGLM's recommended vLLM command uses), and
AUTOGLM_SERVER_URL_OPENAI serves it with `--chat-template-content-format openai`. Greedy answers
must equal transformers' greedy tokens for the same messages; `usage.prompt_tokens` must count the
image tokens; bad images are 400s that name the problem.

The Open-AutoGLM test sends what `phone_agent/model/client.py` (zai-org/Open-AutoGLM) sends: one
streamed request per agent step with its sampling settings, a 1080x2400 RGBA PNG screenshot as a
data URL in the newest user turn, earlier user turns stripped to their text and earlier replies as
`<think>...</think><answer>...</answer>`.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import pathlib

import openai
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "glm4v-tiny"
MODEL = "glm4v-tiny"
GREEDY = {"ignore_eos": True, "return_token_ids": True}


def _client(var: str) -> openai.OpenAI:
    url = os.environ.get(var)
    if not url:
        pytest.fail(f"{var} is not set: run these tests through .ci/test-server.sh")
    return openai.OpenAI(base_url=url.rstrip("/") + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def string_client() -> openai.OpenAI:
    return _client("AUTOGLM_SERVER_URL")


@pytest.fixture(scope="module")
def openai_client() -> openai.OpenAI:
    return _client("AUTOGLM_SERVER_URL_OPENAI")


@pytest.fixture(scope="module")
def expected() -> dict:
    return json.loads((FIXTURE / "expected.json").read_text())


def data_url(name: str) -> str:
    mime = "image/jpeg" if name.endswith(".jpg") else "image/png"
    return f"data:{mime};base64," + base64.b64encode((FIXTURE / name).read_bytes()).decode()


def inline(messages: list) -> list:
    """The fixture's messages with image file names replaced by data URLs."""
    out = json.loads(json.dumps(messages))
    for m in out:
        if isinstance(m["content"], list):
            for p in m["content"]:
                if p["type"] == "image_url":
                    p["image_url"]["url"] = data_url(p["image_url"]["url"])
    return out


def client_for(case, string_client, openai_client):
    return string_client if case["content_format"] == "string" else openai_client


@pytest.mark.parametrize("index", [0, 1, 2, 3])
def test_greedy_answers_with_images_equal_transformers(index, expected, string_client, openai_client):
    case = expected["cases"][index]
    client = client_for(case, string_client, openai_client)
    messages = inline(case["messages"])
    want = case["greedy_token_ids"]
    r = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=len(want), temperature=0, extra_body=GREEDY
    )
    assert r.choices[0].model_extra["token_ids"] == want, case["name"]
    assert r.usage.prompt_tokens == len(case["prompt_token_ids"]), "image tokens are counted"
    assert r.usage.completion_tokens == len(want)
    text = r.choices[0].message.content

    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=len(want),
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    parts, usage = [], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
    assert "".join(parts) == text
    assert usage is not None and usage.prompt_tokens == len(case["prompt_token_ids"])


def test_tokenize_expands_the_images(expected, string_client):
    case = expected["cases"][1]
    assert case["content_format"] == "string"
    url = os.environ["AUTOGLM_SERVER_URL"].rstrip("/")
    import urllib.request

    req = urllib.request.Request(
        url + "/tokenize",
        data=json.dumps({"model": MODEL, "messages": inline(case["messages"])}).encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        assert json.loads(r.read())["tokens"] == case["prompt_token_ids"]


def test_local_files_only_under_the_allowed_path(expected, string_client):
    media = pathlib.Path(os.environ["AUTOGLM_MEDIA_DIR"])
    ask = lambda url: string_client.chat.completions.create(  # noqa: E731
        model=MODEL,
        max_tokens=2,
        messages=[
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "?"}],
            }
        ],
    )
    assert ask(f"file://{media / 'exact.png'}").usage.prompt_tokens > 6
    with pytest.raises(openai.BadRequestError, match="outside the allowed local media path"):
        ask(str(FIXTURE / "exact.png"))


def _chat(client, content, model=MODEL, **kw):
    return client.chat.completions.create(
        model=model, max_tokens=2, messages=[{"role": "user", "content": content}], **kw
    )


@pytest.mark.parametrize(
    "url, needle",
    [
        ("data:image/png;base64,@@@@", "invalid base64"),
        ("data:text/plain;base64,aGVsbG8=", "not an image"),
        ("data:image/png;base64," + base64.b64encode(b"no image here").decode(), "not a PNG, JPEG or WebP"),
        ("http://169.254.169.254/latest/screen.png", "not fetched"),
    ],
)
def test_bad_images_are_400s(string_client, url, needle):
    with pytest.raises(openai.BadRequestError, match=needle) as e:
        _chat(string_client, [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "?"}])
    assert e.value.body["param"] == "messages"


def test_truncated_png_too_many_images_and_text_only_model(string_client):
    png = (FIXTURE / "screen.png").read_bytes()
    half = "data:image/png;base64," + base64.b64encode(png[: len(png) // 2]).decode()
    with pytest.raises(openai.BadRequestError, match="cannot decode"):
        _chat(string_client, [{"type": "image_url", "image_url": {"url": half}}])
    many = [{"type": "image_url", "image_url": {"url": data_url("exact.png")}}] * 4
    with pytest.raises(openai.BadRequestError, match=r"at most 3 image\(s\)"):
        _chat(string_client, many)
    with pytest.raises(openai.BadRequestError, match="does not take images"):
        _chat(string_client, many[:1], model="glm4-tiny")
    # The server keeps serving.
    assert _chat(string_client, many[:1]).usage.completion_tokens == 2


def _tokens_for(height: int, width: int, pre: dict) -> int:
    """Image tokens of one image as transformers' Glm4vImageProcessor.smart_resize sizes it
    (an independent re-statement of its rules: factor 28, the budget counted over two frames)."""
    factor = pre["patch_size"] * pre["merge_size"]
    t = pre["temporal_patch_size"]
    lo, hi = pre["size"]["shortest_edge"], pre["size"]["longest_edge"]
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if t * h_bar * w_bar > hi:
        beta = math.sqrt((height * width * t) / hi)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t * h_bar * w_bar < lo:
        beta = math.sqrt(lo / (height * width * t))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return (h_bar // factor) * (w_bar // factor)


def _screenshot(step: int) -> str:
    from PIL import Image, ImageDraw

    img = Image.new("RGBA", (1080, 2400), (250, 250, 250, 255))
    d = ImageDraw.Draw(img)
    for row in range(12):
        y = 150 + row * 180
        d.rectangle([60, y, 1020, y + 140], fill=(30 + 17 * row, 90 + step * 40, 160, 255))
        d.text((90, y + 50), f"App {row} / step {step}", fill=(0, 0, 0, 255))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_open_autoglm_agent_steps(string_client):
    """Three agent steps as Open-AutoGLM's ModelClient and MessageBuilder send them."""
    pre = json.loads((FIXTURE / "preprocessor_config.json").read_text())
    system = "The current date: 2026-12-02, Wednesday\n# Setup\nYou are a professional Android operation agent."
    context = [{"role": "system", "content": system}]
    for step in range(3):
        text = "打开设置" + "\n\n" if step == 0 else ""
        text += "** Screen Info **\n\n" + json.dumps({"current_app": "System Home"}, ensure_ascii=False)
        context.append(
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{_screenshot(step)}"}},
                    {"type": "text", "text": text},
                ],
            }
        )
        stream = string_client.chat.completions.create(
            messages=context,
            model=MODEL,
            max_tokens=3000,
            temperature=0.0,
            top_p=0.85,
            frequency_penalty=0.2,
            extra_body={},
            stream=True,
        )
        raw = ""
        for chunk in stream:
            if len(chunk.choices) == 0:
                continue
            if chunk.choices[0].delta.content is not None:
                raw += chunk.choices[0].delta.content
        # The random tiny model says nothing useful, but the stream must end with a reason.
        assert isinstance(raw, str)

        # The same messages, not streamed: usage.prompt_tokens is the text plus the image tokens
        # the processor expands the screenshot to.
        r = string_client.chat.completions.create(
            messages=context, model=MODEL, max_tokens=1, temperature=0.0, extra_body={"return_token_ids": True}
        )
        ids = r.model_extra["prompt_token_ids"]
        image_tokens = _tokens_for(2400, 1080, pre)
        assert ids.count(598) == image_tokens, "one image's <|image|> run"
        assert r.usage.prompt_tokens == len(ids)

        # The turn is answered: the image leaves the history, the reply is kept as the agent does.
        context[-1]["content"] = [p for p in context[-1]["content"] if p.get("type") == "text"]
        context.append(
            {"role": "assistant", "content": f'<think>{raw[:40]}</think><answer>do(action="Tap", element=[500,500])</answer>'}
        )
