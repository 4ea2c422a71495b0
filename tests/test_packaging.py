"""What the installed package carries besides code: the benchmark files, found by short name from
any folder without the repository's shared data beside it, and listed in the installed
distribution's record (what the wheel held)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from cir.data import BENCHMARKS

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "benchmarks"
# Rows per file, as the benchmarks' README states them.
ROWS = {
    "aime24": 30,
    "aime25": 30,
    "amc23": 40,
    "math500": 500,
    "olymmath-en-easy": 100,
    "olymmath-en-hard": 100,
}


def test_the_benchmarks_are_found_in_the_installed_package_from_anywhere(tmp_path):
    check = textwrap.dedent(
        """
        import json
        import cir
        from cir.data import BENCHMARKS, benchmark_path, load_problems
        print(json.dumps({
            "package": cir.__file__,
            "paths": {name: str(benchmark_path(name)) for name in BENCHMARKS},
            "rows": {name: len(load_problems(name, split="test")) for name in BENCHMARKS},
        }))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "CIR_BENCHMARK_DIR"}
    proc = subprocess.run(
        [sys.executable, "-c", check], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout)
    package = Path(found["package"]).parent
    assert set(found["paths"]) == set(BENCHMARKS) == set(ROWS)
    for path in found["paths"].values():
        assert Path(path).parent == package / "benchmarks", path
    assert found["rows"] == ROWS
    if SHARED.is_dir():  # the same files as the project's shared set
        for name, file in BENCHMARKS.items():
            assert Path(found["paths"][name]).read_bytes() == (SHARED / file).read_bytes(), name


def test_the_installed_record_lists_the_benchmark_files_with_their_sizes():
    record = {str(f): f for f in importlib.metadata.files("cir")}
    for file in [*BENCHMARKS.values(), "README.md"]:
        entry = record.get(f"cir/benchmarks/{file}")
        assert entry is not None, f"cir/benchmarks/{file} is not in the installed package"
        assert entry.size == Path(entry.locate()).stat().st_size > 1000
    sizes = sum(record[f"cir/benchmarks/{file}"].size for file in BENCHMARKS.values())
    assert sizes < 1 << 20  # well under a MiB in all


def test_an_explicit_folder_still_wins(tmp_path, monkeypatch):
    from cir.data import benchmark_path

    (tmp_path / "aime24.jsonl").write_text('{"problem": "1+1?", "answer": "2"}\n')
    assert benchmark_path("aime24", tmp_path) == tmp_path / "aime24.jsonl"
    monkeypatch.setenv("CIR_BENCHMARK_DIR", str(tmp_path))
    assert benchmark_path("aime24") == tmp_path / "aime24.jsonl"
