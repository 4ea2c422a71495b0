"""The per-sample JSONL of one benchmark: appended one finished problem at a time, read back to resume.

Each problem's rows go out in one write, flushed and synced, so a run that is killed loses at
most the problems in flight. A line cut off by the kill is dropped on reading (and cut from the
file before anything is appended). At the end the file is rewritten in (problem, sample) order,
atomically (`cir.metrics.write_jsonl`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cir.metrics import write_jsonl


class SamplesFile:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.rows: dict[tuple[str, int], dict] = {}  # read back: (problem id, sample) -> row
        self._good_bytes = 0
        if self.path.is_file():
            self._read()

    def _read(self) -> None:
        data = self.path.read_bytes()
        pos = 0
        for line in data.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break  # the last line of a killed run, cut off mid-write
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break
            if isinstance(row, dict) and "id" in row and "sample" in row:
                self.rows[(str(row["id"]), int(row["sample"]))] = row
            pos += len(line)
        self._good_bytes = pos

    def append(self, rows: list[dict]) -> None:
        """Add one problem's rows to the end of the file, durably."""
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        with open(self.path, "ab") as f:
            if f.tell() != self._good_bytes:
                f.truncate(self._good_bytes)
            f.write(text.encode())
            f.flush()
            os.fsync(f.fileno())
            self._good_bytes = f.tell()

    def finalize(self, rows: list[dict]) -> None:
        """Replace the file by `rows` (all of the benchmark's, in order), atomically."""
        write_jsonl(self.path, rows)
        self._good_bytes = self.path.stat().st_size
