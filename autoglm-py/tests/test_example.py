"""The Python quick start runs as documented."""

from __future__ import annotations

import subprocess
import sys

from conftest import FIXTURES, REPO


def test_quickstart_runs() -> None:
    script = REPO / "examples" / "python" / "quickstart.py"
    for args in ([], [str(FIXTURES / "glm-tiny-bf16")]):
        proc = subprocess.run(
            [sys.executable, str(script), *args],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        assert "stream   :" in proc.stdout
        assert "async end: length" in proc.stdout
