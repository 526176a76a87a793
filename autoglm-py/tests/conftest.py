"""Shared fixtures: the two bundled models and their transformers-computed expectations."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import autoglm

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
MODELS = ["glm4-tiny", "glm-tiny-bf16"]


def expected(model: str) -> dict[str, Any]:
    with open(FIXTURES / model / "expected.json", encoding="utf-8") as f:
        return json.load(f)


def greedy(max_tokens: int = 24, **kw: Any) -> autoglm.SamplingParams:
    """The fixtures' greedy continuations were computed with ignore_eos semantics."""
    return autoglm.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


def wait_until(pred: Callable[[], bool], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


def idle(engine: autoglm.Engine) -> bool:
    s = engine.stats()
    return s.running == 0 and s.waiting == 0 and s.kv_blocks_used == 0


@pytest.fixture(scope="session")
def engines() -> Iterator[dict[str, autoglm.Engine]]:
    made = {m: autoglm.Engine(FIXTURES / m, device="cpu") for m in MODELS}
    yield made
    for e in made.values():
        e.close()


@pytest.fixture(params=MODELS)
def model(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def engine(engines: dict[str, autoglm.Engine]) -> autoglm.Engine:
    """The glm4-tiny engine, idle."""
    e = engines["glm4-tiny"]
    assert wait_until(lambda: idle(e)), e.stats()
    return e


@pytest.fixture
def glm4() -> dict[str, Any]:
    return expected("glm4-tiny")
