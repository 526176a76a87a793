"""The engine's log events reach Python's `logging` (through pyo3-log), under `autoglm.*`
loggers, at the levels set before the engine is created, without prompt text."""

from __future__ import annotations

import logging

import pytest

import autoglm
from conftest import FIXTURES, greedy, wait_until


def _ours(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("autoglm.")]


def test_load_step_and_stats_records_arrive_with_their_logger_names(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="autoglm")
    secret = "a secret prompt that must stay out of the logs"
    with autoglm.Engine(FIXTURES / "glm4-tiny", device="cpu", log_stats_interval=0.1) as engine:
        out = engine.generate(secret, greedy(8))
        # The stats record of the window holding the generation comes when the window closes.
        assert wait_until(lambda: any(r.name == "autoglm.stats" for r in caplog.records), 5.0)
    records = _ours(caplog)

    model = [r for r in records if r.name == "autoglm.model"]
    messages = [r.getMessage() for r in model]
    assert messages and messages[0].startswith("loading model"), messages
    assert "architecture=Glm4" in messages[0]
    assert any(m.startswith("loading weights") for m in messages), messages
    assert messages[-1].startswith("model loaded"), messages
    assert all(r.levelno == logging.INFO for r in model)

    engine_records = [r for r in records if r.name == "autoglm.engine"]
    steps = [r for r in engine_records if r.getMessage().startswith("step ")]
    assert len(steps) >= 8, [r.getMessage() for r in engine_records]
    assert all(r.levelno == logging.DEBUG for r in steps)
    assert "prefill_tokens=" in steps[0].getMessage()
    assert any(r.getMessage().startswith("request finished") for r in engine_records)

    stats = [r for r in records if r.name == "autoglm.stats"]
    assert all(r.levelno == logging.INFO for r in stats)
    assert "Avg generation throughput" in stats[0].getMessage()

    text = "\n".join(r.getMessage() for r in records)
    assert "secret" not in text
    if len(out.text.strip()) >= 4:
        assert out.text.strip() not in text


def test_records_below_the_level_set_before_the_engine_are_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The previous test left DEBUG in pyo3-log's level cache; a new engine picks up WARNING.
    caplog.set_level(logging.WARNING, logger="autoglm")
    with autoglm.Engine(FIXTURES / "glm4-tiny", device="cpu", log_stats_interval=0.1) as engine:
        engine.generate("Hello", greedy(4))
    assert [r.getMessage() for r in _ours(caplog) if r.levelno < logging.WARNING] == []

    caplog.set_level(logging.INFO, logger="autoglm")
    with autoglm.Engine(FIXTURES / "glm4-tiny", device="cpu") as engine:
        engine.generate("Hello", greedy(4))
    names = {r.name for r in _ours(caplog)}
    assert "autoglm.model" in names
    # Steps are debug: not at INFO.
    assert not any(r.getMessage().startswith("step ") for r in _ours(caplog))
