"""`cir sandbox run FILE.jsonl`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cir.cli import main
from cir.cli.sandbox import InputError, read_requests


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def test_run_file_to_output(tmp_path, capsys):
    src = write(
        tmp_path / "in.jsonl",
        [
            json.dumps("print(6 * 7)"),
            json.dumps({"code": "x = 5", "id": "a", "traj": "t1"}),
            "",
            json.dumps({"code": "print(x + 1)", "id": "b", "traj": "t1"}),
            json.dumps({"code": "1 / 0", "id": "c"}),
            json.dumps({"code": "while True: pass", "id": "d"}),
        ],
    )
    out = tmp_path / "out.jsonl"
    rc = main(["sandbox", "run", src, "-o", str(out), "--workers", "2", "--timeout", "1", "--session-field", "traj"])
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "error", "timeout"]
    assert rows[0]["stdout"] == "42\n"
    assert rows[2]["stdout"] == "6\n" and rows[2]["id"] == "b" and rows[2]["traj"] == "t1"  # fields echoed
    assert rows[3]["error_line"] == "ZeroDivisionError: division by zero"
    assert rows[3]["feedback"] == "ZeroDivisionError: division by zero"
    assert "code" not in rows[1]
    assert capsys.readouterr().err == ""  # no progress bar when stderr is not a terminal


def test_results_on_stdout_through_the_console_command(tmp_path):
    src = write(tmp_path / "in.jsonl", [json.dumps("print('hi')")])
    cmd = [sys.executable, "-m", "cir", "sandbox", "run", src, "--workers", "1", "--timeout", "5"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (row,) = [json.loads(line) for line in done.stdout.splitlines()]
    assert (row["status"], row["stdout"]) == ("ok", "hi\n")


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "not valid JSON"),
        ("42", "expected a JSON string or an object"),
        ('{"cod": "print(1)"}', "field 'code' is missing"),
        ('{"code": 3}', "field 'code' is missing or not a string"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, capsys, line, message):
    src = write(tmp_path / "bad.jsonl", [json.dumps("print(1)"), line])
    with pytest.raises(InputError, match=rf"bad\.jsonl:2: .*{message}"):
        read_requests(src)
    assert main(["sandbox", "run", src]) == 2
    err = capsys.readouterr().err
    assert f"{src}:2:" in err and message in err


def test_missing_file(tmp_path, capsys):
    assert main(["sandbox", "run", str(tmp_path / "nope.jsonl")]) == 2
    assert "nope.jsonl: cannot read" in capsys.readouterr().err
