"""Running the real `tlvproxy` command line in a subprocess, for CLI tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    """`python -m tlvproxy ARGS...` in `cwd`, its output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "tlvproxy", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )
