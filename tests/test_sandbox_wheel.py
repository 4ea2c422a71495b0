"""The compiled extension ships in the wheel: build it with pip, install it into a plain new
virtual environment (no system site-packages, no dependencies: the extension needs
neither torch nor a compiler) and run a snippet there."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_extension_importable_from_built_wheel(tmp_path):
    wheel_dir = tmp_path / "wheels"
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            ".",
            "--no-build-isolation",
            "--no-deps",
            "-w",
            str(wheel_dir),
            "-C",
            f"build-dir={tmp_path / 'build'}",
            "-q",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert build.returncode == 0, build.stderr[-4000:]
    (wheel,) = glob.glob(str(wheel_dir / "cir-*.whl"))

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    assert "include-system-site-packages = false" in (venv / "pyvenv.cfg").read_text()
    python = str(venv / "bin" / "python")
    install = subprocess.run(
        [python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr[-4000:]

    check = textwrap.dedent(
        """
        import cir, cir._sandbox, sys
        assert cir._sandbox.__file__.startswith(sys.prefix), cir._sandbox.__file__
        from cir.sandbox import Sandbox
        with Sandbox(workers=1, preload=("math",), warmup=False) as sb:
            r = sb.run("import math; print(math.factorial(5))")
        print(r.status, r.stdout.strip())
        """
    )
    # Run from an empty directory so the source tree cannot be imported by accident.
    done = subprocess.run(
        [python, "-c", check],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.split() == ["ok", "120"]
