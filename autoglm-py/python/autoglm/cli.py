"""The ``autoglm`` command: ``autoglm serve [MODEL] [--port P] [--api-key K] ...``, ``autoglm generate``.

The command line is the Rust ``autoglm`` binary's own (one clap definition, run in-process by the
extension module), so ``pip install autoglm`` and ``cargo install --path autoglm-cli`` give the
same flags, the same ``AUTOGLM_*`` environment variables and the same ``--config`` files; see
``autoglm --help``. Exit status: 0 after success or a graceful stop (SIGINT, SIGTERM), 1 for an
error (a model that does not load, an address in use, a bad value), 2 for bad usage.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Sequence

from . import _autoglm


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``autoglm`` console script; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    # The command stops a server gracefully on SIGINT/SIGTERM itself; Python's own SIGINT handler
    # would raise KeyboardInterrupt once it returns, so the default actions stand meanwhile.
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, signal.SIG_DFL)
        except ValueError:  # not the main thread: signals are not ours to change
            pass
    try:
        sys.stdout.flush()
        return int(_autoglm.cli_main(["autoglm", *args]))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
