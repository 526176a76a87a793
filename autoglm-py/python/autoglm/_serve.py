"""``autoglm.serve``: run the OpenAI-compatible server in the foreground until SIGINT or SIGTERM.

How stopping works: on the main thread, ``serve`` installs handlers for SIGINT and SIGTERM (and
puts the previous ones back afterwards). The server runs on threads of its own; the main thread
sits in ``Server.wait()``, which releases the GIL and wakes every 100 ms to let Python run its
signal handlers. The first signal calls ``Server.shutdown()``, which only flags the server (it
never blocks, so it is safe in a handler): ``/ready`` answers 503 at once, new connections are
still served for ``shutdown_drain_delay`` seconds, then it stops accepting, refuses new
generations and lets open requests finish within ``shutdown_grace`` seconds; ``wait()`` then returns and ``stop()``
releases the threads and engines. A second signal closes the remaining connections at once.
Nothing raises out of the handlers, so there is no ``KeyboardInterrupt`` to land in the middle of
clean-up code, and the process's own signal handling is untouched once ``serve`` returns.
"""

from __future__ import annotations

import contextlib
import inspect
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any, ParamSpec, TypeVar

from ._autoglm import Server

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _log(message: str) -> None:
    print(f"autoglm: {message}", file=sys.stderr, flush=True)


def _same_parameters_as(
    cls: Callable[_P, Any],
) -> Callable[[Callable[..., _R]], Callable[_P, _R]]:
    """Gives the decorated function the parameters of ``cls`` (for type checkers and help())."""

    def decorate(f: Callable[..., _R]) -> Callable[_P, _R]:
        with contextlib.suppress(TypeError, ValueError):
            f.__signature__ = inspect.signature(cls).replace(  # type: ignore[attr-defined]
                return_annotation=None
            )
        return f

    return decorate


@contextlib.contextmanager
def _stop_on_signals(server: Server) -> Iterator[None]:
    """While active (main thread only): SIGINT/SIGTERM shut the server down, a second one forces."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[str] = []

    def handle(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        received.append(name)
        if len(received) == 1:
            _log(
                f"{name}: stopping; /ready fails now, new connections are served for "
                f"{server.shutdown_drain_delay:g}s, then open requests get up to "
                f"{server.shutdown_grace:g}s to finish "
                "(signal again to stop at once)"
            )
            server.shutdown()
        else:
            _log(f"{name}: closing the remaining connections now")
            server.shutdown(force=True)

    previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            # None: the handler was not installed from Python; the default is the best guess.
            signal.signal(s, h if h is not None else signal.SIG_DFL)


@_same_parameters_as(Server)
def serve(*args: Any, **kwargs: Any) -> None:
    """Serves models over the OpenAI-compatible HTTP API until SIGINT (Ctrl-C) or SIGTERM.

    Takes the arguments of ``autoglm.Server``: ``serve("path/to/model", port=8000,
    api_keys=["sk-..."])``. Loads the models, listens, logs the address to stderr, and blocks.
    The first SIGINT or SIGTERM stops it gracefully (open requests get ``shutdown_grace``
    seconds); a second one closes the remaining connections at once. Either way ``serve``
    returns normally once everything is stopped. Signals are handled only when called from the
    main thread; elsewhere use ``autoglm.Server`` and call ``stop()``.

    Raises ``ModelLoadError`` for a model that does not load, ``ServerError`` for an address that
    cannot be bound (port in use), and ``InvalidRequestError`` for a bad option.
    """
    server = Server(*args, **kwargs)
    with _stop_on_signals(server):
        names = ", ".join(server.models)
        _log(f"loading {names}")
        server.start()
        if server.running:
            for address in server.addresses:
                where = address if address.startswith("unix:") else f"{_scheme(server)}://{address}"
                _log(f"serving {names} on {where} (Ctrl-C or SIGTERM to stop)")
            server.wait()
        server.stop()
    _log("stopped")


def _scheme(server: Server) -> str:
    return server.url.split(":", 1)[0]
