"""autoglm: an inference engine for GLM-family language models.

>>> import autoglm
>>> engine = autoglm.Engine("tests/fixtures/glm4-tiny", device="cpu")
>>> out = engine.generate("Hello", autoglm.SamplingParams(max_tokens=8, temperature=0))
>>> print(out.text, out.finish_reason, out.usage)

Everything is implemented in the native module ``autoglm._autoglm`` and re-exported here.
"""

from ._autoglm import (
    AffinityError,
    AsyncRequestStream,
    AutoglmError,
    BackendError,
    CompletionChunk,
    CompletionOutput,
    CudaUnavailableError,
    Engine,
    EngineShutdownError,
    EngineStats,
    InvalidRequestError,
    ModelLoadError,
    RequestOutput,
    RequestStream,
    SamplingParams,
    TemplateError,
    TokenizerError,
    Tokenizer,
    TokenLogprobs,
    Usage,
    __version__,
)

__all__ = [
    "AffinityError",
    "AsyncRequestStream",
    "AutoglmError",
    "BackendError",
    "CompletionChunk",
    "CompletionOutput",
    "CudaUnavailableError",
    "Engine",
    "EngineShutdownError",
    "EngineStats",
    "InvalidRequestError",
    "ModelLoadError",
    "RequestOutput",
    "RequestStream",
    "SamplingParams",
    "TemplateError",
    "TokenizerError",
    "Tokenizer",
    "TokenLogprobs",
    "Usage",
    "__version__",
]
