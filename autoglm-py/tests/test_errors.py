"""Every exception path maps to the autoglm hierarchy; never a PanicException."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import autoglm
from autoglm import _autoglm
from conftest import FIXTURES, greedy, idle, wait_until


def test_hierarchy() -> None:
    for cls in (
        autoglm.ModelLoadError,
        autoglm.InvalidRequestError,
        autoglm.CudaUnavailableError,
        autoglm.EngineShutdownError,
        autoglm.TokenizerError,
        autoglm.TemplateError,
        autoglm.AffinityError,
        autoglm.BackendError,
    ):
        assert issubclass(cls, autoglm.AutoglmError)
        assert cls.__module__ == "autoglm"
    assert issubclass(autoglm.AutoglmError, Exception)
    assert issubclass(autoglm.InvalidRequestError, ValueError)
    assert not issubclass(autoglm.ModelLoadError, ValueError)


def test_missing_model_path_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(autoglm.ModelLoadError, match="no-such-model") as info:
        autoglm.Engine(missing, device="cpu")
    assert info.value.path == str(missing)


def copy_fixture(tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(FIXTURES / "glm-tiny-bf16", dst)
    return dst


def test_truncated_checkpoint(tmp_path: Path) -> None:
    model = copy_fixture(tmp_path)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(autoglm.ModelLoadError, match="model.safetensors") as info:
        autoglm.Engine(model, device="cpu")
    assert info.value.path is not None and info.value.path.endswith("model.safetensors")


def test_bad_config_json(tmp_path: Path) -> None:
    model = copy_fixture(tmp_path)
    (model / "config.json").write_text("{ not json")
    with pytest.raises(autoglm.ModelLoadError, match="config.json"):
        autoglm.Engine(model, device="cpu")


def test_unsupported_architecture(tmp_path: Path) -> None:
    model = copy_fixture(tmp_path)
    cfg = json.loads((model / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    (model / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(autoglm.ModelLoadError, match="LlamaForCausalLM"):
        autoglm.Engine(model, device="cpu")


def test_missing_tokenizer(tmp_path: Path) -> None:
    model = copy_fixture(tmp_path)
    (model / "tokenizer.json").unlink()
    with pytest.raises(autoglm.ModelLoadError, match="tokenizer.json"):
        autoglm.Engine(model, device="cpu")


def test_cuda_unavailable() -> None:
    for device in ("cuda", "cuda:1"):
        with pytest.raises(autoglm.CudaUnavailableError, match="cuda"):
            autoglm.Engine(FIXTURES / "glm4-tiny", device=device)


def test_bad_engine_options() -> None:
    model = FIXTURES / "glm4-tiny"
    with pytest.raises(autoglm.InvalidRequestError, match="device"):
        autoglm.Engine(model, device="tpu")
    with pytest.raises(autoglm.InvalidRequestError, match="blok_size"):
        autoglm.Engine(model, device="cpu", blok_size=16)  # type: ignore[arg-type]
    with pytest.raises(autoglm.InvalidRequestError, match="block_size"):
        autoglm.Engine(model, device="cpu", block_size=0)
    with pytest.raises(autoglm.InvalidRequestError, match="max_num_seqs"):
        autoglm.Engine(model, device="cpu", max_num_seqs=-1)
    with pytest.raises(autoglm.InvalidRequestError, match="enable_prefix_caching"):
        autoglm.Engine(model, device="cpu", enable_prefix_caching="yes")  # type: ignore[arg-type]
    with pytest.raises(autoglm.InvalidRequestError, match="compute_cores"):
        autoglm.Engine(model, device="cpu", compute_cores="0,1")  # type: ignore[arg-type]
    for bad in (0, 1.5, -0.1, True, "0.5"):
        message = r"gpu_memory_utilization = .*: must be a number in \(0, 1\]"
        with pytest.raises(autoglm.InvalidRequestError, match=message):
            autoglm.Engine(model, device="cpu", gpu_memory_utilization=bad)  # type: ignore[arg-type]
    with pytest.raises(autoglm.InvalidRequestError, match=r"enforce_eager = 'no': must be a bool"):
        autoglm.Engine(model, device="cpu", enforce_eager="no")  # type: ignore[arg-type]
    # Accepted (and unused) on the CPU backend.
    with autoglm.Engine(
        model, device="cpu", gpu_memory_utilization=0.5, enforce_eager=True
    ) as e:
        out = e.generate([1, 2, 3], autoglm.SamplingParams(max_tokens=1, ignore_eos=True))
        assert out.usage.completion_tokens == 1


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"n": 0}, "n"),
        ({"n": -1}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"min_p": 2.0}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"frequency_penalty": -3.0}, "frequency_penalty"),
        ({"logprobs": 21}, "logprobs"),
        ({"seed": -1}, "seed"),
        ({"stop": [""]}, "stop"),
        ({"stop_token_ids": [-5]}, "stop_token_ids"),
    ],
)
def test_bad_sampling_params(kwargs: dict, field: str) -> None:
    with pytest.raises(autoglm.InvalidRequestError, match=field):
        autoglm.SamplingParams(**kwargs)
    with pytest.raises(ValueError):
        autoglm.SamplingParams(**kwargs)


def test_bad_prompts(engine: autoglm.Engine) -> None:
    with pytest.raises(autoglm.InvalidRequestError, match="empty"):
        engine.generate([], greedy())
    with pytest.raises(autoglm.InvalidRequestError, match="empty"):
        engine.generate("", greedy())
    with pytest.raises(autoglm.InvalidRequestError, match="600"):
        engine.generate([1, 600], greedy())
    with pytest.raises(autoglm.InvalidRequestError, match="-1"):
        engine.generate([1, -1], greedy())
    with pytest.raises(autoglm.InvalidRequestError, match="context length"):
        engine.generate([1] * 5000, greedy())
    with pytest.raises(autoglm.InvalidRequestError, match="empty"):
        engine.stream([], greedy())
    with pytest.raises(TypeError):
        engine.generate(42, greedy())  # type: ignore[call-overload]
    with pytest.raises(TypeError):
        engine.generate([1, "a"], greedy())  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        engine.generate([{"role": "user", "content": object()}], greedy())
    # One bad prompt in a list rejects the whole call; what was submitted is cancelled.
    with pytest.raises(autoglm.InvalidRequestError):
        engine.generate(["fine", [10**5]], greedy(max_tokens=4000))
    assert wait_until(lambda: idle(engine)), engine.stats()


def test_template_errors(engine: autoglm.Engine) -> None:
    with pytest.raises(autoglm.TemplateError):
        engine.apply_chat_template([{"role": "user", "content": "hi"}], tools={"not": "a list"})  # type: ignore[arg-type]


def test_tokenizer_errors(engine: autoglm.Engine) -> None:
    with pytest.raises(autoglm.InvalidRequestError):
        engine.tokenizer.decode([-1])


def test_shutdown_fails_requests_in_flight() -> None:
    e = autoglm.Engine(FIXTURES / "glm4-tiny", device="cpu")
    stream = e.stream([1, 2], greedy(max_tokens=4000))
    next(stream)
    e.close()
    with pytest.raises(autoglm.EngineShutdownError):
        for _ in stream:
            pass
    with pytest.raises(autoglm.EngineShutdownError):
        e.generate([1], greedy())


def test_panic_becomes_autoglm_error() -> None:
    with pytest.raises(autoglm.AutoglmError, match="internal error.*boom"):
        _autoglm._panic_for_tests("boom")
