"""autoglm: an inference engine for GLM-family language models.

>>> import autoglm
>>> engine = autoglm.Engine("tests/fixtures/glm4-tiny", device="cpu")
>>> out = engine.generate("Hello", autoglm.SamplingParams(max_tokens=8, temperature=0))
>>> print(out.text, out.finish_reason, out.usage)

The OpenAI-compatible server runs in-process: ``autoglm.serve("path/to/model", port=8000)`` blocks
until Ctrl-C or SIGTERM; ``with autoglm.Server("path/to/model", port=0) as server: ...`` runs it in
the background (``server.url``). The console script ``autoglm serve --model DIR`` does the same.

Everything but ``serve`` (``autoglm._serve``) and the command line (``autoglm.cli``) is implemented
in the native module ``autoglm._autoglm`` and re-exported here.
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
    Server,
    ServerError,
    TemplateError,
    TokenizerError,
    Tokenizer,
    TokenLogprobs,
    Usage,
    __version__,
)
from ._serve import serve

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
    "Server",
    "ServerError",
    "TemplateError",
    "TokenizerError",
    "Tokenizer",
    "TokenLogprobs",
    "Usage",
    "__version__",
    "serve",
]
