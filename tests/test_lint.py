"""The tree passes ruff's lint and format checks as configured in pyproject.toml (CI runs this)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ruff() -> list[str]:
    exe = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(exe).exists():
        pytest.fail("ruff is not installed: it is part of the test extra (pip install '.[test]')")
    return [exe]


@pytest.mark.parametrize("check", [["check", "--no-cache", "."], ["format", "--check", "--no-cache", "."]])
def test_ruff(check):
    proc = subprocess.run([*_ruff(), *check], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
