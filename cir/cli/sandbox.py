"""`cir sandbox run FILE.jsonl`: run Python snippets from a JSONL file in the sandbox.

Each line is either a JSON string (the code) or a JSON object with a "code" field; the
other fields of an object are echoed back in its result. One JSON result per input line is
written, in input order, to stdout or to ``-o OUT.jsonl``:

    {"status": "ok", "stdout": "4\\n", "stderr": "", "exit_code": 0, "error_line": "",
     "feedback": "4\\n", "wall_ms": 3.1, "cpu_ms": 2.2, "fault": null, "reason": "", "attempts": 1,
     ...echoed fields}

A progress bar is shown on stderr when it is a terminal.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass


class InputError(ValueError):
    """A malformed input line; the message names the file and line."""


@dataclass(frozen=True)
class SnippetRequest:
    code: str
    session: str | None
    extra: dict  # fields echoed back


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="JSONL input: one JSON string (code) or object with 'code' per line")
    parser.add_argument("-o", "--output", default=None, help="write the JSONL results here (default: stdout)")
    parser.add_argument("--workers", type=int, default=None, help="snippets run at once (default: CPU count)")
    parser.add_argument(
        "--timeout", type=float, default=5.0, help="wall-clock limit per snippet in seconds (default 5)"
    )
    parser.add_argument(
        "--memory-mb", type=int, default=2048, help="address-space limit per snippet in MiB (default 2048)"
    )
    parser.add_argument(
        "--max-output-bytes", type=int, default=64 * 1024, help="stdout+stderr kept per snippet (default 65536)"
    )
    parser.add_argument(
        "--session-field",
        default=None,
        metavar="NAME",
        help="object field naming a session: cells of one session run in order and see the "
        "definitions of its earlier successful cells",
    )


def read_requests(path: str, session_field: str | None = None) -> list[SnippetRequest]:
    """Parses the JSONL input; raises InputError naming `path` and the line on bad input.
    Blank lines are skipped."""
    requests: list[SnippetRequest] = []
    try:
        handle = open(path, encoding="utf-8")
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None
    with handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            if isinstance(item, str):
                requests.append(SnippetRequest(item, None, {}))
                continue
            if not isinstance(item, dict):
                raise InputError(f"{where}: expected a JSON string or an object with 'code', got {type(item).__name__}")
            code = item.get("code")
            if not isinstance(code, str):
                raise InputError(f"{where}: field 'code' is missing or not a string")
            session = None
            if session_field is not None and item.get(session_field) is not None:
                session = str(item[session_field])
            extra = {k: v for k, v in item.items() if k != "code"}
            requests.append(SnippetRequest(code, session, extra))
    return requests


def result_record(result, extra: dict) -> dict:
    record = dict(extra)
    record.update(
        status=result.status,
        stdout=result.stdout,
        stderr=result.stderr,
        exit_code=result.exit_code,
        error_line=result.error_line,
        feedback=result.feedback(),
        wall_ms=round(result.wall_ms, 3),
        cpu_ms=round(result.cpu_ms, 3),
        fault=result.fault,  # whose: "model", "sandbox" (status "sandbox_fault", see reason) or null
        reason=result.reason,
        attempts=result.attempts,
    )
    return record


def run(args: argparse.Namespace) -> int:
    try:
        requests = read_requests(args.file, args.session_field)
    except InputError as exc:
        print(f"cir sandbox run: {exc}", file=sys.stderr)
        return 2
    from cir.sandbox.client import (  # (asyncio & co. only once a run starts)
        Sandbox,
        SandboxError,
    )

    try:
        with Sandbox(
            workers=args.workers,
            timeout_s=args.timeout,
            memory_mb=args.memory_mb,
            max_output_bytes=args.max_output_bytes,
        ) as sandbox:
            results = sandbox.run_batch(
                [r.code for r in requests],
                sessions=[r.session for r in requests],
                progress=sys.stderr.isatty(),
            )
    except (SandboxError, ValueError) as exc:
        print(f"cir sandbox run: {exc}", file=sys.stderr)
        return 1
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    try:
        for request, result in zip(requests, results):
            out.write(json.dumps(result_record(result, request.extra), ensure_ascii=False) + "\n")
    finally:
        if args.output:
            out.close()
        else:
            out.flush()
    return 0
