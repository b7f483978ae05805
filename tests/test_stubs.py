"""`_core.pyi` must match the built extension (mypy's stubtest), as pydantic-core checks."""

import subprocess
import sys
from pathlib import Path


def test_core_stub_matches_extension():
    r = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "ferroserve._core"],
        cwd=Path(__file__).resolve().parents[1] / "python",
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
