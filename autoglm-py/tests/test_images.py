"""Chat messages with images on the glm4v-tiny fixture (GLM-4.1V, random weights).

Every way of passing an image (an OpenAI ``image_url`` data URL, ``{"type": "image", "image": X}``
with X bytes, a path, or a Pillow image) must give the prompt transformers rendered and expanded
(``input_ids``) and its greedy tokens (``greedy_token_ids``, ignore_eos), blocking, streamed and
from asyncio. Bad images raise ``InvalidRequestError`` naming the problem.

The JPEG case (``two_images_interleaved``) is left out of the token checks, as the Rust tests leave
it out: JPEG decoders differ from libjpeg-turbo by a few LSB. Its expanded prompt, which depends
only on the image sizes, is checked.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import autoglm
from conftest import FIXTURES, greedy

VISION = FIXTURES / "glm4v-tiny"
PNG_CASES = ["screen_openai", "agent_step_string", "text_only"]


def cases() -> dict[str, dict[str, Any]]:
    import json

    with open(VISION / "expected.json", encoding="utf-8") as f:
        return {c["name"]: c for c in json.load(f)["cases"]}


CASES = cases()


@pytest.fixture(scope="module")
def vision() -> Iterator[dict[str, autoglm.Engine]]:
    """One glm4v-tiny engine per content format (the fixture's cases use both)."""
    made = {
        fmt: autoglm.Engine(VISION, device="cpu", chat_template_content_format=fmt)
        for fmt in ("string", "openai")
    }
    yield made
    for e in made.values():
        e.close()


def data_url(name: str) -> str:
    mime = "image/jpeg" if name.endswith(".jpg") else "image/png"
    return f"data:{mime};base64," + base64.b64encode((VISION / name).read_bytes()).decode()


Part = Callable[[str], dict[str, Any]]

FORMS: dict[str, Part] = {
    "data_url": lambda f: {"type": "image_url", "image_url": {"url": data_url(f)}},
    "data_url_plain_string": lambda f: {"type": "image_url", "image_url": data_url(f)},
    "image_data_url": lambda f: {"type": "image", "image": data_url(f)},
    "bytes": lambda f: {"type": "image", "image": (VISION / f).read_bytes()},
    "bytearray": lambda f: {"type": "image", "image": bytearray((VISION / f).read_bytes())},
    "memoryview": lambda f: {"type": "image", "image": memoryview((VISION / f).read_bytes())},
    "str_path": lambda f: {"type": "image", "image": str(VISION / f)},
    "file_url": lambda f: {"type": "image", "image": f"file://{VISION / f}"},
    "pathlib": lambda f: {"type": "image", "image": VISION / f},
}


def with_images(messages: list[dict[str, Any]], part: Part) -> list[dict[str, Any]]:
    """The case's messages with each ``image_url`` part (a fixture file name) made by ``part``."""
    out = copy.deepcopy(messages)
    for m in out:
        if isinstance(m["content"], list):
            m["content"] = [
                part(p["image_url"]["url"]) if p["type"] == "image_url" else p
                for p in m["content"]
            ]
    return out


def engine_for(vision: dict[str, autoglm.Engine], case: dict[str, Any]) -> autoglm.Engine:
    return vision[case["content_format"]]


def params(case: dict[str, Any]) -> autoglm.SamplingParams:
    return greedy(max_tokens=len(case["greedy_token_ids"]))


def check(out: autoglm.RequestOutput, case: dict[str, Any]) -> None:
    assert out.prompt == case["rendered"]
    assert out.prompt_token_ids == case["input_ids"]
    assert out.usage.prompt_tokens == len(case["input_ids"])
    assert out.token_ids == case["greedy_token_ids"], case["name"]
    assert out.finish_reason == "length"


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("name", PNG_CASES)
def test_greedy_tokens_match_the_fixture(
    vision: dict[str, autoglm.Engine], name: str, form: str
) -> None:
    case = CASES[name]
    messages = with_images(case["messages"], FORMS[form])
    check(engine_for(vision, case).generate(messages, params(case)), case)


@pytest.mark.parametrize("name", PNG_CASES)
def test_pil_images_match_the_fixture(vision: dict[str, autoglm.Engine], name: str) -> None:
    # screen.png is RGBA with semi-transparent pixels: composited over white as transformers does.
    Image = pytest.importorskip("PIL.Image")
    case = CASES[name]
    opened: list[Any] = []

    def pil(f: str) -> dict[str, Any]:
        img = Image.open(VISION / f)
        opened.append(img)
        return {"type": "image", "image": img}

    messages = with_images(case["messages"], pil)
    check(engine_for(vision, case).generate(messages, params(case)), case)
    for img in opened:
        img.close()


def test_pil_images_of_other_modes(vision: dict[str, autoglm.Engine]) -> None:
    Image = pytest.importorskip("PIL.Image")
    case = CASES["screen_openai"]
    engine = vision["openai"]
    with Image.open(VISION / "screen.png") as img:
        img.load()
        # A palette image with transparency and a grey one go through the same conversion.
        for converted in (img.convert("P"), img.convert("LA"), img.convert("RGB")):
            out = engine.generate(
                with_images(case["messages"], lambda f: {"type": "image", "image": converted}),
                greedy(max_tokens=2),
            )
            assert out.prompt_token_ids == case["input_ids"]


def test_jpeg_case_expands_to_the_reference_prompt(vision: dict[str, autoglm.Engine]) -> None:
    case = CASES["two_images_interleaved"]
    for form in ("data_url", "bytes", "str_path"):
        out = engine_for(vision, case).generate(
            with_images(case["messages"], FORMS[form]), greedy(max_tokens=2)
        )
        assert out.prompt == case["rendered"]
        assert out.prompt_token_ids == case["input_ids"]


def test_many_chats_with_images_in_one_call(vision: dict[str, autoglm.Engine]) -> None:
    engine = vision["openai"]
    names = ["screen_openai", "text_only", "screen_openai"]
    forms = ["data_url", "data_url", "bytes"]
    prompts = [with_images(CASES[n]["messages"], FORMS[f]) for n, f in zip(names, forms)]
    outs = engine.generate(prompts, greedy(max_tokens=16))
    assert isinstance(outs, list)
    for out, n in zip(outs, names):
        check(out, CASES[n])


@pytest.mark.parametrize("name", ["screen_openai", "agent_step_string"])
def test_stream_equals_generate(vision: dict[str, autoglm.Engine], name: str) -> None:
    case = CASES[name]
    engine = engine_for(vision, case)
    messages = with_images(case["messages"], FORMS["bytes"])
    stream = engine.stream(messages, params(case))
    assert stream.prompt == case["rendered"]
    assert stream.prompt_token_ids == case["input_ids"]
    chunks = list(stream)
    assert [t for c in chunks for t in c.token_ids] == case["greedy_token_ids"]
    full = engine.generate(messages, params(case))
    assert "".join(c.text for c in chunks) == full.text
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == len(case["input_ids"])


def test_asyncio(vision: dict[str, autoglm.Engine]) -> None:
    case = CASES["screen_openai"]
    engine = vision["openai"]
    messages = with_images(case["messages"], FORMS["data_url"])

    async def main() -> None:
        one = await engine.generate_async(messages, params(case))
        check(one, case)
        many = await engine.generate_async([messages, messages], params(case))
        for out in many:
            check(out, case)
        gathered = await asyncio.gather(
            *(engine.generate_async(messages, params(case)) for _ in range(3))
        )
        for out in gathered:
            check(out, case)
        ids: list[int] = []
        async for chunk in engine.stream_async(messages, params(case)):
            ids += chunk.token_ids
        assert ids == case["greedy_token_ids"]
        # Errors surface when awaited.
        bad = with_images(case["messages"], lambda f: {"type": "image", "image": b"not an image"})
        fut = engine.generate_async(bad, params(case))
        with pytest.raises(autoglm.InvalidRequestError, match="not a PNG, JPEG or WebP"):
            await fut
        # Cancelled while its images may still be preprocessed: nothing is left behind.
        task = asyncio.ensure_future(engine.generate_async(messages, greedy(max_tokens=200)))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())


def png_bytes() -> bytes:
    return (VISION / "screen.png").read_bytes()


def one_image(part: dict[str, Any], text: str = "What is on this screen?") -> list[dict[str, Any]]:
    return [{"role": "user", "content": [part, {"type": "text", "text": text}]}]


@pytest.mark.parametrize(
    ("part", "message"),
    [
        (
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}},
            "invalid base64",
        ),
        ({"type": "image_url", "image_url": {"url": "data:text/plain;base64,AAAA"}}, "not an image"),
        ({"type": "image", "image": b"not an image at all"}, "not a PNG, JPEG or WebP"),
        ({"type": "image", "image": png_bytes()[:300]}, "image 0: "),
        ({"type": "image", "image": "/no/such/dir/screen.png"}, "/no/such/dir/screen.png"),
        # The OpenAI form reads local files only under allowed_local_media_path.
        ({"type": "image_url", "image_url": {"url": str(VISION / "screen.png")}}, "not allowed"),
        ({"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/a.png"}}, "not fetched"),
        ({"type": "image"}, "an image part needs `image`"),
        ({"type": "image", "image": None}, "an image part needs `image`"),
        ({"type": "video", "video": "x"}, "not supported"),
    ],
)
def test_bad_images_raise_invalid_request_error(
    vision: dict[str, autoglm.Engine], part: dict[str, Any], message: str
) -> None:
    engine = vision["openai"]
    with pytest.raises(autoglm.InvalidRequestError, match=re.escape(message)):
        engine.generate(one_image(part), greedy(max_tokens=2))
    with pytest.raises(autoglm.InvalidRequestError, match=re.escape(message)):
        engine.stream(one_image(part), greedy(max_tokens=2))


def test_truncated_png_names_the_decoder_error(vision: dict[str, autoglm.Engine]) -> None:
    with pytest.raises(autoglm.InvalidRequestError) as info:
        vision["openai"].generate(
            one_image({"type": "image", "image": png_bytes()[:300]}), greedy(max_tokens=2)
        )
    assert re.search(r"image 0: .*(decode|truncated|eof|header)", str(info.value), re.I), info.value


def test_wrong_image_types_raise_type_error(vision: dict[str, autoglm.Engine]) -> None:
    engine = vision["openai"]
    with pytest.raises(TypeError, match=r"messages\[0\]\.content\[0\]\.image must be"):
        engine.generate(one_image({"type": "image", "image": 42}), greedy(max_tokens=2))
    with pytest.raises(TypeError, match=r"image_url\.url must be a str"):
        engine.generate(
            one_image({"type": "image_url", "image_url": {"url": png_bytes()}}), greedy()
        )


def test_images_for_a_text_only_model(engine: autoglm.Engine) -> None:
    for part in (
        {"type": "image_url", "image_url": {"url": data_url("screen.png")}},
        {"type": "image", "image": png_bytes()},
    ):
        with pytest.raises(autoglm.InvalidRequestError, match="does not take images"):
            engine.generate(one_image(part), greedy(max_tokens=2))
    # Text parts alone are fine.
    out = engine.generate(
        [{"role": "user", "content": [{"type": "text", "text": "Hello"}]}], greedy(max_tokens=2)
    )
    assert out.prompt == engine.apply_chat_template([{"role": "user", "content": "Hello"}])


@pytest.mark.parametrize("limit", [{"image": 1}, '{"image": 1}'])
def test_limit_mm_per_prompt(limit: Any) -> None:
    with autoglm.Engine(VISION, device="cpu", limit_mm_per_prompt=limit) as e:
        two = [
            {"role": "user", "content": [
                FORMS["bytes"]("exact.png"),
                FORMS["data_url"]("half.png"),
                {"type": "text", "text": "two"},
            ]}
        ]
        with pytest.raises(autoglm.InvalidRequestError, match=r"at most 1 image\(s\).*got 2"):
            e.generate(two, greedy(max_tokens=2))
        case = CASES["agent_step_string"]
        check(e.generate(with_images(case["messages"], FORMS["bytes"]), params(case)), case)


def test_mm_processor_kwargs_set_the_pixel_budget() -> None:
    case = CASES["screen_openai"]
    messages = with_images(case["messages"], FORMS["bytes"])
    # The fixture's own budget changes nothing; a smaller one gives fewer image tokens.
    same = {"size": {"longest_edge": 18816, "shortest_edge": 6272}}
    with autoglm.Engine(
        VISION, device="cpu", mm_processor_kwargs=same, chat_template_content_format="openai"
    ) as e:
        check(e.generate(messages, params(case)), case)
    with autoglm.Engine(
        VISION,
        device="cpu",
        mm_processor_kwargs='{"max_pixels": 6272, "min_pixels": 3136}',
        chat_template_content_format="openai",
        encoder_cache_mb=1,
        media_nice=0,
        inline_encoder=True,
    ) as e:
        out = e.generate(messages, greedy(max_tokens=2))
        assert out.prompt == case["rendered"]
        assert len(out.prompt_token_ids) < len(case["input_ids"])


def test_allowed_local_media_path(tmp_path: Path) -> None:
    case = CASES["screen_openai"]
    local = with_images(
        case["messages"],
        lambda f: {"type": "image_url", "image_url": {"url": str(VISION / f)}},
    )
    with autoglm.Engine(
        VISION,
        device="cpu",
        allowed_local_media_path=VISION,
        chat_template_content_format="openai",
    ) as e:
        check(e.generate(local, params(case)), case)
        outside = tmp_path / "screen.png"
        outside.write_bytes(png_bytes())
        with pytest.raises(autoglm.InvalidRequestError, match="outside the allowed local media"):
            e.generate(
                one_image({"type": "image_url", "image_url": {"url": f"file://{outside}"}}),
                greedy(max_tokens=2),
            )
        # Python objects are the caller's own: read wherever they are.
        out = e.generate(one_image({"type": "image", "image": outside}), greedy(max_tokens=2))
        assert out.prompt_token_ids == case["input_ids"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"limit_mm_per_prompt": "nope"}, "engine option limit_mm_per_prompt = 'nope': not JSON"),
        ({"limit_mm_per_prompt": 5}, "engine option limit_mm_per_prompt = 5: must be a dict"),
        ({"limit_mm_per_prompt": {"image": -1}}, "limit_mm_per_prompt"),
        ({"limit_mm_per_prompt": {"video": 2}}, "this engine takes only images"),
        ({"mm_processor_kwargs": {"bogus": 1}}, "engine option mm_processor_kwargs"),
        ({"mm_processor_kwargs": '{"max_pixels": 0}'}, "max_pixels: 0 is not a positive"),
        (
            {"mm_processor_kwargs": {"max_pixels": 100, "min_pixels": 200}},
            "mm_processor_kwargs: min_pixels 200 is above max_pixels 100",
        ),
        (
            {"chat_template_content_format": "auto"},
            "chat_template_content_format = 'auto': must be \"string\" or \"openai\"",
        ),
        ({"chat_template_content_format": 1}, "chat_template_content_format"),
        ({"allowed_local_media_path": "/no/such/dir"}, "allowed_local_media_path = '/no/such/dir'"),
        ({"allowed_local_media_path": 3}, "allowed_local_media_path = 3: must be a path"),
        ({"encoder_cache_mb": -1}, "encoder_cache_mb = -1"),
        ({"encoder_cache_mb": 2**62}, "encoder_cache_mb"),
        ({"media_nice": 20}, "media_nice = 20: must be an int in 0..19"),
        ({"media_nice": -1}, "media_nice = -1"),
        ({"inline_encoder": "yes"}, "inline_encoder = 'yes': must be a bool"),
    ],
)
def test_bad_image_options(options: dict[str, Any], message: str) -> None:
    with pytest.raises(autoglm.InvalidRequestError, match=re.escape(message)):
        autoglm.Engine(VISION, device="cpu", **options)
    with pytest.raises(autoglm.InvalidRequestError, match=re.escape(message)):
        autoglm.Server(VISION, device="cpu", **options)


# The OpenAI-compatible server and the console script, with the same options.


def openai_chat_checks(url: str, model: str) -> None:
    """A screenshot chat gives the fixture's tokens; two images are over the limit of one."""
    import openai

    from test_server import client_for

    case = CASES["screen_openai"]
    client = client_for(url)
    r = client.chat.completions.create(
        model=model,
        messages=with_images(case["messages"], FORMS["data_url"]),  # type: ignore[arg-type]
        max_tokens=len(case["greedy_token_ids"]),
        temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    assert r.usage is not None and r.usage.prompt_tokens == len(case["input_ids"])
    assert r.choices[0].model_extra is not None
    assert r.choices[0].model_extra["token_ids"] == case["greedy_token_ids"]
    two = [{"role": "user", "content": [
        FORMS["data_url"]("exact.png"), FORMS["data_url"]("half.png"),
    ]}]
    with pytest.raises(openai.BadRequestError, match=re.escape("at most 1 image(s)")):
        client.chat.completions.create(model=model, messages=two, max_tokens=2)  # type: ignore[arg-type]


def test_server_takes_the_image_options() -> None:
    with autoglm.Server(
        VISION,
        port=0,
        device="cpu",
        served_model_name="v",
        limit_mm_per_prompt={"image": 1},
        chat_template_content_format="openai",
        mm_processor_kwargs={"max_pixels": 18816},
        encoder_cache_mb=16,
    ) as s:
        openai_chat_checks(s.url, "v")


def test_console_script_takes_the_vllm_flags() -> None:
    from test_server import Served

    served = Served(
        "--model", str(VISION), "--served-model-name", "phone", "--port", "0",
        "--max-model-len", "1024", "--limit-mm-per-prompt", '{"image": 1}',
        "--mm-processor-kwargs", '{"max_pixels": 18816}',
        "--chat-template-content-format", "openai",
        "--allowed-local-media-path", str(VISION), "--encoder-cache-mb", "16",
    )
    try:
        served.expect(r"loaded `phone`")
        url = served.expect(r"listening on (http://127\.0\.0\.1:\d+)").group(1)
        openai_chat_checks(url, "phone")
    finally:
        served.kill()


def test_console_script_names_a_bad_image_option() -> None:
    import subprocess

    from test_server import console_script

    proc = subprocess.run(
        [console_script(), "serve", "--model", str(VISION), "--port", "0",
         "--limit-mm-per-prompt", "{image: 1}"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert "limit_mm_per_prompt" in proc.stderr and '"{image: 1}" is not JSON' in proc.stderr
    proc = subprocess.run(
        [console_script(), "serve", "--chat-template-content-format", "auto"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2 and "--chat-template-content-format" in proc.stderr
