"""The ``autoglm`` command: ``autoglm serve --model DIR [--host H] [--port P] [--api-key K] ...``.

Runs the OpenAI-compatible server in-process (``autoglm.serve``) until SIGINT or SIGTERM, then
exits 0 after a graceful stop. With no ``--model`` it serves the tiny test checkpoint of the source
tree the package was built from, if that is still there (its weights are random). Exit status:
0 after a stop, 1 for an error (a model that does not load, a port in use, a bad option), 2 for
bad usage.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import _autoglm
from ._autoglm import AutoglmError, InvalidRequestError
from ._serve import serve


def bundled_model() -> Path | None:
    """The tiny GLM-4 test checkpoint (random weights), if it can be found: in the source tree the
    package was built from, or under ``tests/fixtures`` of the current directory."""
    for candidate in (
        Path(_autoglm._BUNDLED_MODEL),
        Path.cwd() / "tests" / "fixtures" / "glm4-tiny",
    ):
        if (candidate / "config.json").is_file():
            return candidate.resolve()
    return None


def _core_list(text: str) -> list[int]:
    """``0,2,3`` as a list of core ids (for argparse, which names the flag on a ValueError)."""
    cores = [int(part) for part in text.split(",")]
    if any(c < 0 for c in cores):
        raise ValueError(text)
    return cores


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autoglm", description="autoglm: inference for GLM-family language models."
    )
    parser.add_argument("--version", action="version", version=f"autoglm {_autoglm.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    s = commands.add_parser(
        "serve",
        help="serve models over an OpenAI-compatible HTTP API",
        description="Serve models over an OpenAI-compatible HTTP API until SIGINT or SIGTERM.",
    )
    add = s.add_argument
    add("--model", action="append", default=[], metavar="[NAME=]DIR",
        help="a checkpoint directory to serve, optionally named (repeatable); "
        "default: the bundled tiny model")
    add("--served-model-name", metavar="NAME",
        help="name of the model given by a lone --model DIR (default: the directory's name)")
    add("--host", default="127.0.0.1", help="IP address to listen on (default: %(default)s)")
    add("--port", type=int, default=8000, help="TCP port; 0 picks a free one (default: %(default)s)")
    add("--no-tcp", action="store_true", help="do not listen on --host/--port (use --unix-socket)")
    add("--unix-socket", metavar="PATH", help="listen on this Unix socket too")
    add("--api-key", action="append", default=[], metavar="KEY",
        help="accept this API key, role user (repeatable); without any key the API is open")
    add("--admin-api-key", action="append", default=[], metavar="KEY",
        help="accept this API key, role admin (repeatable)")
    add("--api-keys-file", metavar="FILE",
        help="TOML file of [[keys]] tables (key, name, role, priority, limits)")
    add("--tls-cert", metavar="PEM", help="certificate chain for TLS 1.3 (with --tls-key)")
    add("--tls-key", metavar="PEM", help="private key for TLS 1.3 (with --tls-cert)")
    add("--requests-per-minute", type=float, help="per caller, at least 1 (default: unlimited)")
    add("--tokens-per-minute", type=float,
        help="prompt plus generated, per caller; a request reserves its prompt plus max_tokens "
        "per choice and gets back what it did not use")
    add("--audit-log", metavar="FILE", help="append a JSON line per request ('-': stderr)")
    add("--audit-log-prompts", action="store_true", help="include prompts in the audit log")
    add("--max-connections", type=int, help="open connections at most (more get a 503)")
    add("--max-connections-per-ip", type=int,
        help="open connections from one client address at most, more are closed at once "
        "(default: half of --max-connections; behind a proxy, give --max-connections)")
    add("--max-concurrent-requests", type=int, help="generations in flight at most")
    add("--max-waiting-requests", type=int,
        help="refuse generations while an engine has this many waiting")
    add("--max-choices-per-request", type=int,
        help="choices one request may create, prompts times n (default 128)")
    add("--max-body-bytes", type=int, help="largest request body")
    add("--request-timeout", type=float, help="seconds a generation may take")
    add("--idle-timeout", type=float, help="seconds a connection may sit idle")
    add("--stream-interval", type=int,
        help="streamed tokens written to a connection together (default 1)")
    add("--stream-write-timeout", type=float,
        help="seconds a response's socket may take no byte (a client that stopped reading) "
        "before its connection is closed and its request cancelled (default 30; 0: none)")
    add("--shutdown-grace", type=float,
        help="seconds open requests get to finish on SIGINT/SIGTERM once the listeners stop "
        "accepting; streams still running then end with an error event (default: 30)")
    add("--shutdown-drain-delay", type=float, default=5.0,
        help="seconds between SIGINT/SIGTERM and the listeners' stop: /ready answers 503 while "
        "new connections are still served, so load balancers drain first (default 5; 0: none)")
    add("--unload-timeout", type=float,
        help="seconds DELETE /admin/models/NAME waits for the model's running requests before "
        "it stops the engine, ending them (default 30; 0: forever)")
    add("--prefix-cache-scope", choices=["principal", "global"],
        help="which requests reuse each other's cached prompt blocks: principal (default: one "
        "API key or JWT subject never reuses another's) or global (all share, as vLLM)")
    add("--model-root", metavar="DIR",
        help="POST /admin/models loads only checkpoint directories under DIR (off without it)")
    add("--workers", type=int, help="HTTP threads (default: one per core)")
    add("--http-cores", type=_core_list, metavar="LIST",
        help="cores the HTTP threads stay on, e.g. 1,2,3")
    add("--no-pin", action="store_true",
        help="leave every thread to the OS scheduler (default, serving one model on two cores or "
        "more without --engine-core or --http-cores: the engine loop on the first core, the "
        "HTTP threads on the others)")
    add("--reuse-port", action="store_true",
        help="one SO_REUSEPORT socket per worker (several servers may then share a port)")
    engine = s.add_argument_group("engine options")
    add = engine.add_argument
    add("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    add("--block-size", type=int, help="tokens per KV-cache block")
    add("--num-blocks", type=int, help="KV-cache blocks (default: from --kv-cache-mb)")
    add("--kv-cache-mb", type=int, help="memory for the KV cache, in MiB")
    add("--no-prefix-caching", action="store_true", help="disable reuse of cached prompt prefixes")
    add("--max-num-seqs", type=int, help="sequences running at once")
    add("--engine-core", type=int, help="pin the engine loop to this core")
    add("--compute-cores", type=_core_list, metavar="LIST",
        help="one compute thread pinned to each of these cores, e.g. 0,1")
    add("--max-num-batched-tokens", type=int, help="tokens per forward pass")
    add("--max-model-len", type=int, help="longest sequence (default: the model's)")
    add("--threads", type=int, dest="num_threads", help="compute threads")
    add("--seed", type=int, help="seed of the engine's random numbers")
    add("--gpu-memory-utilization", type=float,
        help="share of the GPU's free memory for weights and KV cache (CUDA; default 0.9)")
    add("--enforce-eager", action="store_true",
        help="CUDA: launch every kernel of every decode step instead of replaying CUDA graphs")
    images = s.add_argument_group("image options (GLM-4.1V models)")
    add = images.add_argument
    add("--limit-mm-per-prompt", metavar="JSON",
        help='most images one prompt may carry, as vLLM spells it: \'{"image": 10}\'')
    add("--mm-processor-kwargs", metavar="JSON",
        help='the pixel budget of the image processor: \'{"max_pixels": 5000000}\' '
        '(or "min_pixels"; or transformers\' {"size": {"longest_edge": ..., "shortest_edge": ...}})')
    add("--chat-template-content-format", choices=["string", "openai"],
        help="how list contents reach the chat template: string (default: one string per "
        "message, image placeholders first, as Open-AutoGLM's vLLM command renders) or openai "
        "(the list, each image part as {\"type\": \"image\"})")
    add("--allowed-local-media-path", metavar="DIR",
        help="image_url parts may name local files under this directory (default: none)")
    add("--encoder-cache-mb", type=int,
        help="memory for encoded image features kept for reuse, in MiB (default 256)")
    add("--media-nice", type=int,
        help="nice value 0..19 of the image threads (default 19: decode steps take shared "
        "cores first; 0 favours image throughput)")
    add("--inline-encoder", action="store_true", default=None,
        help="run the vision tower on the engine thread between steps instead of beside them")
    return parser


def _models(specs: Sequence[str], served_model_name: str | None) -> dict[str, Any]:
    """``model``/``served_model_name``/``models`` keywords from the ``--model`` values."""
    if not specs:
        found = bundled_model()
        if found is None:
            raise AutoglmError(
                "no --model given, and the bundled tiny model was not found (looked in "
                f"{Path(_autoglm._BUNDLED_MODEL)} and ./tests/fixtures/glm4-tiny); "
                "pass --model DIR"
            )
        print(
            f"autoglm: note: no --model given; serving the bundled tiny GLM-4 model at {found}.\n"
            "         Its weights are RANDOM: expect gibberish, not language.",
            file=sys.stderr,
        )
        return {"model": found, "served_model_name": served_model_name or "glm4-tiny"}
    named: list[tuple[str | None, str]] = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if sep and name and "/" not in name:
            named.append((name, path))
        else:
            named.append((None, spec))
    if len(named) == 1 and named[0][0] is None:
        return {"model": named[0][1], "served_model_name": served_model_name}
    if served_model_name is not None:
        raise InvalidRequestError(
            "--served-model-name needs a lone --model DIR; use --model NAME=DIR"
        )
    models: dict[str, str] = {}
    for given, directory in named:
        key = given if given is not None else Path(directory).resolve().name
        if key in models:
            raise InvalidRequestError(f"two models are named {key!r}; use --model NAME=DIR")
        models[key] = directory
    return {"models": models}


def _default_cores(args: argparse.Namespace, options: dict[str, Any]) -> None:
    """The serving layout ``examples/serve`` uses too: one model on two cores or more, no core
    given: the engine loop on the first core this process may use, the HTTP threads on the rest
    (so the loop never waits behind socket work)."""
    if args.no_pin or args.engine_core is not None or args.http_cores is not None:
        return
    if len(options.get("models", ())) > 1:  # several models: their engine loops would share a core
        return
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return
    args.engine_core, args.http_cores = cores[0], cores[1:]
    print(
        f"autoglm: cores: engine loop on core {cores[0]}, HTTP threads on {cores[1:]} "
        "(--no-pin leaves them to the OS)",
        file=sys.stderr,
    )


def _serve(args: argparse.Namespace) -> None:
    options: dict[str, Any] = _models(args.model, args.served_model_name)
    if args.reuse_port:
        options["reuse_port"] = True
    if args.no_prefix_caching:
        options["enable_prefix_caching"] = False
    if args.enforce_eager:
        options["enforce_eager"] = True
    _default_cores(args, options)
    for name in (
        "unix_socket", "api_keys_file", "tls_cert", "tls_key", "requests_per_minute",
        "tokens_per_minute", "audit_log", "max_connections", "max_connections_per_ip",
        "max_concurrent_requests", "max_waiting_requests", "max_choices_per_request",
        "max_body_bytes", "request_timeout", "idle_timeout", "stream_interval",
        "stream_write_timeout", "shutdown_grace", "shutdown_drain_delay",
        "unload_timeout", "prefix_cache_scope", "model_root", "workers", "block_size", "num_blocks", "kv_cache_mb",
        "max_num_seqs", "max_num_batched_tokens", "max_model_len", "num_threads", "seed",
        "gpu_memory_utilization", "http_cores", "engine_core", "compute_cores",
        "limit_mm_per_prompt", "mm_processor_kwargs", "chat_template_content_format",
        "allowed_local_media_path", "encoder_cache_mb", "media_nice", "inline_encoder",
    ):
        value = getattr(args, name)
        if value is not None:
            options[name] = value
    serve(
        host=None if args.no_tcp else args.host,
        port=args.port,
        api_keys=args.api_key,
        admin_api_keys=args.admin_api_key,
        audit_log_prompts=args.audit_log_prompts,
        device=args.device,
        **options,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``autoglm`` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            _serve(args)
    except AutoglmError as e:
        print(f"autoglm: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # Only outside serve()'s own signal handling (e.g. while arguments are checked).
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
