"""The sandbox supervisor's C++ core under AddressSanitizer and UndefinedBehaviorSanitizer.

`tests/native/supervisor_driver.cpp` drives `cir::sandbox::Supervisor` directly (no Python in
the driver process) as `Sandbox.arun` does: snippets in flight, outcomes taken on the caller's
thread while the supervisor's I/O thread tears finished processes down. It is compiled here
with the sanitizers, so a use of freed memory, a leak or undefined behaviour in the supervisor
fails the test (a freed request written to after its slot was released once corrupted the
training process's heap at random).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cir.sandbox import launch_settings

ROOT = Path(__file__).resolve().parents[1]
SANITIZE = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"]


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")


def _sanitizers_work(cxx: str, tmp: Path) -> bool:
    src = tmp / "probe.cpp"
    src.write_text("int main() { return 0; }\n")
    exe = tmp / "probe"
    done = subprocess.run([cxx, *SANITIZE, str(src), "-o", str(exe)], capture_output=True)
    return done.returncode == 0 and subprocess.run([str(exe)], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def driver(tmp_path_factory) -> Path:
    cxx = _compiler()
    tmp = tmp_path_factory.mktemp("native")
    if cxx is None or not _sanitizers_work(cxx, tmp):
        pytest.skip("no C++ compiler with AddressSanitizer/UndefinedBehaviorSanitizer here")
    sources = sorted(str(p) for p in (ROOT / "src" / "sandbox").glob("*.cpp"))
    exe = tmp / "supervisor_driver"
    cmd = [
        cxx,
        "-std=c++17",
        "-O1",
        "-g",
        *SANITIZE,
        f"-I{ROOT / 'src'}",
        *sources,
        str(ROOT / "tests" / "native" / "supervisor_driver.cpp"),
        "-o",
        str(exe),
        "-pthread",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    return exe


def _spec(path: Path, workers: int) -> None:
    s = launch_settings(workers=workers)
    exe = s["executable"]
    if exe.startswith("/proc/"):  # /proc/self/exe would be the driver itself
        exe = os.path.realpath(sys.executable)
    fields = [
        exe,
        str(len(s["argv"])),
        *s["argv"],
        str(len(s["env"])),
        *s["env"],
        s["config_json"],
        s["policy_json"],
        str(workers),
    ]
    path.write_bytes(b"".join(f.encode() + b"\0" for f in fields))


def test_supervisor_is_clean_under_sanitizers(driver, tmp_path):
    spec = tmp_path / "spec.bin"
    _spec(spec, workers=2)
    env = dict(os.environ)
    env["ASAN_OPTIONS"] = "detect_leaks=1:abort_on_error=0:exitcode=99"
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1"
    done = subprocess.run([str(driver), str(spec), "600", "6"], capture_output=True, text=True, env=env, timeout=600)
    report = done.stderr[-6000:]
    assert "Sanitizer" not in done.stderr, report
    assert done.returncode == 0, f"exit {done.returncode}\n{report}"
    assert "done 600 wrong 0" in done.stdout, done.stdout + report
