"""Type stubs of the native module ``autoglm._autoglm`` (checked by ``mypy.stubtest``)."""

import asyncio
import os
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import (
    Any,
    ClassVar,
    Literal,
    NoReturn,
    Protocol,
    TypeAlias,
    TypedDict,
    final,
    overload,
    type_check_only,
)

from typing_extensions import NotRequired

__all__ = [
    "__version__",
    "AutoglmError",
    "ModelLoadError",
    "InvalidRequestError",
    "CudaUnavailableError",
    "EngineShutdownError",
    "TokenizerError",
    "TemplateError",
    "AffinityError",
    "BackendError",
    "ServerError",
    "Engine",
    "SamplingParams",
    "Tokenizer",
    "RequestOutput",
    "CompletionOutput",
    "CompletionChunk",
    "TokenLogprobs",
    "Usage",
    "EngineStats",
    "RequestStream",
    "AsyncRequestStream",
    "Server",
    "cli_main",
]

__version__: str

@type_check_only
class _PILImage(Protocol):
    """What the engine reads of a ``PIL.Image.Image`` (Pillow is optional)."""

    @property
    def mode(self) -> str: ...
    @property
    def size(self) -> tuple[int, int]: ...
    def tobytes(self) -> bytes: ...

_ImageData: TypeAlias = bytes | bytearray | memoryview | str | os.PathLike[str] | _PILImage
"""The image of an ``{"type": "image", "image": ...}`` part: an encoded PNG, JPEG or WebP file,
a path read by this process, a ``PIL.Image.Image``, or a ``data:`` URL (str)."""

@type_check_only
class _TextPart(TypedDict):
    type: Literal["text"]
    text: str

@type_check_only
class _ImageURL(TypedDict):
    url: str
    """``data:image/png;base64,...``; a local path only under ``allowed_local_media_path``."""
    detail: NotRequired[str]

@type_check_only
class _ImageURLPart(TypedDict):
    """An image as the OpenAI API sends it."""

    type: Literal["image_url"]
    image_url: _ImageURL | str

@type_check_only
class _ImagePart(TypedDict):
    """An image given as Python data."""

    type: Literal["image"]
    image: _ImageData

_ContentPart: TypeAlias = _TextPart | _ImageURLPart | _ImagePart
"""A part of a message's ``content`` list."""

@type_check_only
class _ChatMessage(TypedDict):
    role: str
    content: NotRequired[str | Sequence[_ContentPart] | None]

_Message: TypeAlias = _ChatMessage | Mapping[str, Any]
"""A chat message: ``{"role": ..., "content": ...}`` plus any keys the template reads;
``content`` is a str or a list of content parts (text, ``image_url``, ``image``)."""
_PromptInput: TypeAlias = str | Sequence[int] | Sequence[_Message]
"""Text, token ids, or chat messages."""
_FinishReason: TypeAlias = Literal["stop", "length", "abort"]
_Params: TypeAlias = SamplingParams | Sequence[SamplingParams] | None
_ManyPrompts: TypeAlias = list[_PromptInput] | tuple[_PromptInput, ...]
"""Many prompts: one result each."""
_ManyChats: TypeAlias = Sequence[Sequence[_Message]]
"""Many chats (``list[list[dict[str, Any]]]`` is not a ``list[_PromptInput]``: lists are
invariant)."""

# Exceptions

class AutoglmError(Exception):
    """Base class of every error autoglm raises."""

class ModelLoadError(AutoglmError):
    """The model directory could not be loaded; ``path`` names the file at fault if known."""

    path: str | None

class InvalidRequestError(AutoglmError, ValueError):
    """A request, its sampling parameters or an engine option was rejected."""

class CudaUnavailableError(AutoglmError):
    """A CUDA device was asked for but none is usable."""

class EngineShutdownError(AutoglmError):
    """The engine has been closed or its thread has stopped."""

class TokenizerError(AutoglmError):
    """The tokenizer failed to encode or decode."""

class TemplateError(AutoglmError):
    """The chat template failed to render."""

class AffinityError(AutoglmError):
    """Pinning a thread to a CPU core failed."""

class BackendError(AutoglmError):
    """A backend operation failed, or an internal error."""

class ServerError(AutoglmError, OSError):
    """The HTTP server could not start (address in use, unreadable TLS or key file), or was used
    in the wrong state; ``errno`` is set when the system gave one."""

# Parameters

@final
class SamplingParams:
    """How a request is sampled and when it stops (mirrors vLLM's ``SamplingParams``)."""

    n: int
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repetition_penalty: float
    presence_penalty: float
    frequency_penalty: float
    seed: int | None
    stop_token_ids: list[int]
    ignore_eos: bool
    logprobs: int | None
    skip_special_tokens: bool
    __hash__: ClassVar[None]  # type: ignore[assignment]

    def __new__(
        cls,
        *,
        n: int = 1,
        max_tokens: int = 16,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        seed: int | None = None,
        stop_token_ids: Sequence[int] | None = None,
        stop: str | Sequence[str] | None = None,
        ignore_eos: bool = False,
        logprobs: int | None = None,
        skip_special_tokens: bool = True,
        structured_outputs: Mapping[str, Any] | None = None,
    ) -> SamplingParams: ...
    @property
    def structured_outputs(self) -> dict[str, Any] | None:
        """The grammar the output must match, as vLLM's ``structured_outputs``: ``{"json":
        schema}``, ``{"regex": str}``, ``{"choice": [str, ...]}``, ``{"grammar": lark}`` or
        ``{"json_object": True}``; ``None`` leaves the output free."""
    @structured_outputs.setter
    def structured_outputs(self, value: Mapping[str, Any] | None) -> None: ...
    @property
    def stop(self) -> list[str]: ...
    @stop.setter
    def stop(self, value: str | Sequence[str] | None) -> None: ...
    @staticmethod
    def greedy(**changes: Any) -> SamplingParams:
        """Greedy decoding (temperature 0); other fields as given."""

    def replace(self, **changes: Any) -> SamplingParams:
        """A copy with some fields changed, validated."""

    def to_dict(self) -> dict[str, Any]: ...
    def __eq__(self, other: object, /) -> bool: ...
    def __copy__(self) -> SamplingParams: ...
    def __deepcopy__(self, memo: Any, /) -> SamplingParams: ...

# Results

@final
class Usage:
    """Token counts of a request."""

    @property
    def prompt_tokens(self) -> int: ...
    @property
    def completion_tokens(self) -> int: ...
    @property
    def cached_prompt_tokens(self) -> int: ...
    @property
    def total_tokens(self) -> int: ...
    def __eq__(self, other: object, /) -> bool: ...
    __hash__: ClassVar[None]  # type: ignore[assignment]

@final
class TokenLogprobs:
    """Logprobs of one generated token, under the model's raw distribution."""

    @property
    def token_id(self) -> int: ...
    @property
    def logprob(self) -> float: ...
    @property
    def top(self) -> list[tuple[int, float]]: ...

@final
class CompletionOutput:
    """One finished choice of a request."""

    @property
    def index(self) -> int: ...
    @property
    def text(self) -> str: ...
    @property
    def token_ids(self) -> list[int]: ...
    @property
    def logprobs(self) -> list[TokenLogprobs] | None: ...
    @property
    def finish_reason(self) -> _FinishReason | None: ...

@final
class RequestOutput:
    """The result of one prompt; ``text`` etc. are those of the first choice."""

    @property
    def request_id(self) -> int: ...
    @property
    def prompt(self) -> str | None: ...
    @property
    def prompt_token_ids(self) -> list[int]: ...
    @property
    def outputs(self) -> list[CompletionOutput]: ...
    @property
    def usage(self) -> Usage: ...
    @property
    def text(self) -> str: ...
    @property
    def token_ids(self) -> list[int]: ...
    @property
    def logprobs(self) -> list[TokenLogprobs] | None: ...
    @property
    def finish_reason(self) -> _FinishReason | None: ...

@final
class CompletionChunk:
    """One streamed delta of one choice."""

    @property
    def request_id(self) -> int: ...
    @property
    def index(self) -> int: ...
    @property
    def text(self) -> str: ...
    @property
    def token_ids(self) -> list[int]: ...
    @property
    def logprobs(self) -> list[TokenLogprobs] | None: ...
    @property
    def finish_reason(self) -> _FinishReason | None: ...
    @property
    def usage(self) -> Usage | None: ...

@final
class EngineStats:
    """A snapshot of the engine's live counters."""

    @property
    def waiting(self) -> int: ...
    @property
    def running(self) -> int: ...
    @property
    def kv_blocks_used(self) -> int: ...
    @property
    def kv_blocks_total(self) -> int: ...
    @property
    def steps(self) -> int: ...
    @property
    def preemptions(self) -> int: ...
    @property
    def prompt_tokens_computed(self) -> int: ...
    @property
    def generated_tokens(self) -> int: ...

# Streams

@final
class RequestStream:
    """The deltas of one request; iterating waits with the GIL released."""

    @property
    def request_id(self) -> int: ...
    @property
    def prompt(self) -> str | None: ...
    @property
    def prompt_token_ids(self) -> list[int]: ...
    def __iter__(self) -> RequestStream: ...
    def __next__(self) -> CompletionChunk: ...
    def cancel(self) -> None: ...
    def close(self) -> None: ...
    def __enter__(self) -> RequestStream: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
        /,
    ) -> bool: ...

@final
class AsyncRequestStream:
    """The deltas of one request, for ``async for``."""

    @property
    def request_id(self) -> int: ...
    @property
    def prompt(self) -> str | None: ...
    @property
    def prompt_token_ids(self) -> list[int]: ...
    def __aiter__(self) -> AsyncRequestStream: ...
    def __anext__(self) -> asyncio.Future[CompletionChunk]: ...
    def cancel(self) -> None: ...
    def aclose(self) -> asyncio.Future[None]: ...
    def __aenter__(self) -> asyncio.Future[AsyncRequestStream]: ...
    def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
        /,
    ) -> asyncio.Future[None]: ...

# Tokenizer and engine

@final
class Tokenizer:
    """The model's tokenizer and chat template."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]: ...
    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...
    def apply_chat_template(
        self,
        messages: Sequence[_Message],
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
    ) -> str: ...
    def token_to_id(self, token: str) -> int | None: ...
    def id_to_token(self, token_id: int) -> str | None: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def eos_token_ids(self) -> list[int]: ...
    @property
    def has_chat_template(self) -> bool: ...

@final
class Engine:
    """An inference engine over one model directory."""

    # `**options` is Never-typed so that a type checker flags unknown options; at run time an
    # unknown option raises InvalidRequestError naming it.
    def __new__(
        cls,
        model: str | os.PathLike[str],
        *,
        device: str = "auto",
        block_size: int | None = None,
        num_blocks: int | None = None,
        kv_cache_mb: int | None = None,
        enable_prefix_caching: bool | None = None,
        max_num_seqs: int | None = None,
        max_num_batched_tokens: int | None = None,
        max_model_len: int | None = None,
        engine_core: int | None = None,
        compute_cores: Sequence[int] | None = None,
        num_threads: int | None = None,
        seed: int | None = None,
        gpu_memory_utilization: float | None = None,
        enforce_eager: bool | None = None,
        limit_mm_per_prompt: Mapping[str, int] | str | None = None,
        mm_processor_kwargs: Mapping[str, Any] | str | None = None,
        chat_template_content_format: Literal["string", "openai"] | None = None,
        allowed_local_media_path: str | os.PathLike[str] | None = None,
        encoder_cache_mb: int | None = None,
        media_nice: int | None = None,
        inline_encoder: bool | None = None,
        log_stats_interval: float | None = None,
        **options: NoReturn,
    ) -> Engine: ...
    @overload
    def generate(
        self, prompts: _PromptInput, params: _Params = None, *, priority: int = 0
    ) -> RequestOutput: ...
    @overload
    def generate(
        self, prompts: _ManyPrompts, params: _Params = None, *, priority: int = 0
    ) -> list[RequestOutput]: ...
    @overload
    def generate(
        self, prompts: _ManyChats, params: _Params = None, *, priority: int = 0
    ) -> list[RequestOutput]: ...
    def chat(
        self, messages: Sequence[_Message], params: _Params = None, *, priority: int = 0
    ) -> RequestOutput: ...
    def stream(
        self, prompt: _PromptInput, params: _Params = None, *, priority: int = 0
    ) -> RequestStream: ...
    @overload
    def generate_async(
        self, prompts: _PromptInput, params: _Params = None, *, priority: int = 0
    ) -> asyncio.Future[RequestOutput]: ...
    @overload
    def generate_async(
        self, prompts: _ManyPrompts, params: _Params = None, *, priority: int = 0
    ) -> asyncio.Future[list[RequestOutput]]: ...
    @overload
    def generate_async(
        self, prompts: _ManyChats, params: _Params = None, *, priority: int = 0
    ) -> asyncio.Future[list[RequestOutput]]: ...
    def stream_async(
        self, prompt: _PromptInput, params: _Params = None, *, priority: int = 0
    ) -> AsyncRequestStream: ...
    def apply_chat_template(
        self,
        messages: Sequence[_Message],
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
    ) -> str: ...
    @property
    def tokenizer(self) -> Tokenizer: ...
    def stats(self) -> EngineStats: ...
    @property
    def max_model_len(self) -> int: ...
    @property
    def device(self) -> str: ...
    @property
    def model_path(self) -> str: ...
    @property
    def model_config(self) -> dict[str, Any]: ...
    @property
    def closed(self) -> bool: ...
    def close(self) -> None: ...
    def __enter__(self) -> Engine: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
        /,
    ) -> bool: ...

# Server

_ApiKey: TypeAlias = str | Mapping[str, Any]
"""An API key: the secret (role ``user``), or ``{"key", "name", "role", "priority", "limits"}``."""

@final
class Server:
    """The OpenAI-compatible HTTP server, run in-process on its own threads."""

    def __new__(
        cls,
        model: str | os.PathLike[str] | None = None,
        *,
        models: Mapping[str, str | os.PathLike[str]] | None = None,
        served_model_name: str | None = None,
        host: str | None = "127.0.0.1",
        port: int = 8000,
        unix_socket: str | os.PathLike[str] | None = None,
        api_keys: _ApiKey | Sequence[_ApiKey] | None = None,
        admin_api_keys: str | Sequence[str] | None = None,
        api_keys_file: str | os.PathLike[str] | None = None,
        tls_cert: str | os.PathLike[str] | None = None,
        tls_key: str | os.PathLike[str] | None = None,
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
        audit_log: str | os.PathLike[str] | None = None,
        audit_log_prompts: bool = False,
        max_connections: int | None = None,
        max_connections_per_ip: int | None = None,
        max_concurrent_requests: int | None = None,
        max_waiting_requests: int | None = None,
        max_choices_per_request: int | None = None,
        max_body_bytes: int | None = None,
        request_timeout: float | None = None,
        idle_timeout: float | None = None,
        stream_interval: int | None = None,
        stream_write_timeout: float | None = None,
        shutdown_grace: float | None = None,
        shutdown_drain_delay: float | None = None,
        unload_timeout: float | None = None,
        prefix_cache_scope: str | None = None,
        model_root: str | os.PathLike[str] | None = None,
        allowed_origins: Sequence[str] | None = None,
        metrics_public: bool | None = None,
        workers: int | None = None,
        http_cores: Sequence[int] | None = None,
        reuse_port: bool | None = None,
        config: Mapping[str, Any] | None = None,
        device: str = "auto",
        block_size: int | None = None,
        num_blocks: int | None = None,
        kv_cache_mb: int | None = None,
        enable_prefix_caching: bool | None = None,
        max_num_seqs: int | None = None,
        max_num_batched_tokens: int | None = None,
        max_model_len: int | None = None,
        engine_core: int | None = None,
        compute_cores: Sequence[int] | None = None,
        num_threads: int | None = None,
        seed: int | None = None,
        gpu_memory_utilization: float | None = None,
        enforce_eager: bool | None = None,
        limit_mm_per_prompt: Mapping[str, int] | str | None = None,
        mm_processor_kwargs: Mapping[str, Any] | str | None = None,
        chat_template_content_format: Literal["string", "openai"] | None = None,
        allowed_local_media_path: str | os.PathLike[str] | None = None,
        encoder_cache_mb: int | None = None,
        media_nice: int | None = None,
        inline_encoder: bool | None = None,
        log_stats_interval: float | None = None,
        **options: NoReturn,
    ) -> Server: ...
    def start(self) -> Server:
        """Loads the models, binds, starts serving and returns (the server itself)."""

    def shutdown(self, force: bool = False) -> None:
        """Asks the server to stop, without waiting (safe in a signal handler)."""

    def stop(self, force: bool = False) -> None:
        """Stops the server and waits until it has (graceful unless ``force``)."""

    def wait(self, timeout: float | None = None) -> bool:
        """Waits until the server has stopped; False if ``timeout`` seconds passed first."""

    @property
    def running(self) -> bool: ...
    @property
    def url(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def addresses(self) -> list[str]: ...
    @property
    def models(self) -> list[str]: ...
    @property
    def shutdown_grace(self) -> float: ...
    @property
    def shutdown_drain_delay(self) -> float: ...
    def __enter__(self) -> Server: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
        /,
    ) -> bool: ...

def cli_main(argv: list[str]) -> int:
    """Runs the ``autoglm`` command (the Rust binary's own definition) on ``argv``, program name
    first, with the GIL released; returns the exit status."""

_BUNDLED_MODEL: str
"""The tiny test checkpoint in the source tree the module was built from (may no longer exist)."""

def _panic_for_tests(message: str) -> None: ...
