"""Problems: loading math datasets, and the seeded, resumable sampler the trainer draws from.

`load_problems` reads a JSONL / JSON / parquet file, a directory of them, a bundled benchmark
by short name (``aime24``, ``math500``, ...), or a Hugging Face dataset, and turns every row
into a `Problem` with one reference answer. A row that cannot be used fails at load time with
the file, the line and what is wrong, never later inside a training step. `load_problem_set`
also knows the problem sets made by code (`register_problem_set`: the demo task registers
``demo``).

`ProblemSampler` walks the problems in a reshuffled order each epoch; its position is two
integers, so a resumed run draws exactly the batches the uninterrupted run would have.

`find_overlong` is the one rule for prompts too long for the model (no room left for a response
in its context), applied at load by `cir train` (`drop_or_refuse_overlong`) and `cir eval`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from cir.rewards.answers import extract_boxed

# Bundled evaluation sets: short name -> file name in the benchmark directory. The files ship
# inside the package (cir/benchmarks, with a README on where they come from).
BENCHMARKS: dict[str, str] = {
    "aime24": "aime24.jsonl",
    "aime25": "aime25.jsonl",
    "amc23": "amc23.jsonl",
    "math500": "math500.jsonl",
    "olymmath-en-easy": "olymmath-en-easy.jsonl",
    "olymmath-en-hard": "olymmath-en-hard.jsonl",
}
BENCHMARK_DIR_ENV = "CIR_BENCHMARK_DIR"

PROBLEM_FIELDS = ("problem", "question", "prompt")
ANSWER_FIELDS = ("answer", "final_answer")
SOLUTION_FIELD = "solution"
ID_FIELDS = ("id", "unique_id", "idx")
DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


class DatasetError(ValueError):
    """A dataset row or file that cannot be used; the message names the file and the row."""


@dataclass
class DataConfig:
    """`data.*`: where the problems come from and how they are shown to the model."""

    # A .jsonl/.json file, a folder, a benchmark short name (aime24, math500, ...), a Hugging
    # Face dataset name, or a registered problem set's name ("demo": the demo task's arithmetic).
    train: str = "demo"
    eval: list[str] = field(default_factory=lambda: ["demo"])
    eval_limit: int | None = None  # at most this many problems per eval set
    prompt: str = "cir"  # a prompt template name (cir.prompts)
    problem_field: str | None = None
    answer_field: str | None = None
    benchmark_dir: str | None = None  # where benchmark short names are looked up
    # A prompt that leaves no room for a response in the model's context stops `cir train` at
    # load (exit 2, naming how many and the first rows); true: such prompts are left out of
    # data.train and data.eval instead, with a logged count.
    drop_overlong: bool = False


# ---------------------------------------------------------------------------------------------
# Problem sets made by code (a task registers its own)


# (split, *, seed, options) -> problems; see `register_problem_set`.
ProblemSetFn = Callable[..., list["Problem"]]
_PROBLEM_SETS: dict[str, ProblemSetFn] = {}


def register_problem_set(name: str, load: ProblemSetFn, *, overwrite: bool = False) -> None:
    """Make `data.train=name` / `data.eval=[name]` call `load(split, seed=..., options=...)`:
    `split` is "train" or "test", `seed` the run's seed, `options` the config section registered
    under the same name (None if none)."""
    if name in _PROBLEM_SETS and not overwrite:
        raise ValueError(f"a problem set named {name!r} is already registered (pass overwrite=True)")
    _PROBLEM_SETS[name] = load


def load_problem_set(
    spec: str,
    *,
    split: str,
    limit: int | None = None,
    seed: int = 0,
    options: Any = None,
    benchmark_dir: str | os.PathLike | None = None,
    problem_field: str | None = None,
    answer_field: str | None = None,
) -> list[Problem]:
    """`load_problems`, where `spec` may also name a registered problem set (given `seed` and
    `options`). Any failure is a `DatasetError` whose message starts with `spec`."""
    try:
        if spec in _PROBLEM_SETS:
            problems = _PROBLEM_SETS[spec](split, seed=seed, options=options)
            return problems if limit is None else problems[:limit]
        return load_problems(
            spec,
            split=split,
            limit=limit,
            benchmark_dir=benchmark_dir,
            problem_field=problem_field,
            answer_field=answer_field,
        )
    except DatasetError:
        raise
    except (OSError, KeyError, ValueError, ImportError) as e:
        raise DatasetError(f"{spec}: {e}") from e


@dataclass
class Problem:
    id: str
    problem: str  # the problem statement shown to the model
    answer: str  # the reference answer (bare: "\frac{1}{2}", not a worked solution)
    source: str  # where it came from (file stem, benchmark or dataset name)
    meta: dict[str, Any] = field(default_factory=dict)  # the row's other fields
    where: str = ""  # the row in its file, for messages ("train.jsonl:12", "data.json row 3")


# ---------------------------------------------------------------------------------------------
# Reference answers


def answer_from_solution(solution: str) -> str:
    """The answer a solution field holds: the last box of a solution with one (a ``\\boxed{X}``
    alone or a worked solution), else the text itself as a bare answer.

    Raises ValueError for a worked solution (several lines, or long prose) without a box, and
    for a solution whose last box is never closed.
    """
    text = solution.strip()
    if "\\boxed" in text or "\\fbox" in text:
        boxed = extract_boxed(text)
        if boxed is None:
            raise ValueError("the solution's last \\boxed{} is not closed")
        return boxed.strip()
    if "\n" in text or len(text) > 200:
        raise ValueError("the solution looks like a worked solution but has no \\boxed{} answer")
    if len(text) >= 2 and text[0] == "$" and text[-1] == "$":
        text = text.strip("$").strip()
    return text


def reference_answer(row: dict, answer_field: str | None = None) -> str:
    """The reference answer of a dataset row.

    answer_field given: that field (a bare answer, or a solution ending in a box). Otherwise
    the first non-empty of ``answer`` / ``final_answer``, else ``solution``.
    Raises ValueError (without location; `load_problems` adds it) when there is none.
    """
    if answer_field is not None:
        if answer_field not in row:
            raise ValueError(f"no answer field {answer_field!r}; fields present: {sorted(row)}")
        candidates = [answer_field]
    else:
        candidates = [f for f in (*ANSWER_FIELDS, SOLUTION_FIELD) if f in row and not _is_blank(row[f])]
        if not candidates:
            present = [f for f in (*ANSWER_FIELDS, SOLUTION_FIELD) if f in row]
            if present:
                raise ValueError(f"empty answer (field {present[0]!r})")
            raise ValueError(
                f"no answer field (looked for {', '.join(repr(f) for f in (*ANSWER_FIELDS, SOLUTION_FIELD))}); "
                f"fields present: {sorted(row)}"
            )
    name = candidates[0]
    value = row[name]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"answer field {name!r} holds {type(value).__name__}, expected text or a number")
    if _is_blank(value):
        raise ValueError(f"empty answer (field {name!r})")
    answer = answer_from_solution(str(value))
    if not answer:
        raise ValueError(f"empty answer (field {name!r} has an empty box)")
    return answer


def _is_blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


# ---------------------------------------------------------------------------------------------
# Loading


def load_problems(
    spec: str | os.PathLike,
    *,
    split: str = "train",
    problem_field: str | None = None,
    answer_field: str | None = None,
    limit: int | None = None,
    benchmark_dir: str | os.PathLike | None = None,
    hf_config: str | None = None,
) -> list[Problem]:
    """Load problems from `spec`:

    * a ``.jsonl`` / ``.json`` / ``.parquet`` file (``split`` ignored; parquet needs pyarrow);
    * a directory: its data files whose names start with `split` (``train.jsonl``,
      ``test-00000.parquet``), or, when none does, all its data files, in name order;
    * a bundled benchmark's short name (see `BENCHMARKS`), looked up in `benchmark_dir`, else
      ``$CIR_BENCHMARK_DIR``, else in the package (``cir/benchmarks``);
    * otherwise a Hugging Face dataset name (``datasets.load_dataset(spec, hf_config,
      split=split)``; needs ``pip install datasets``).

    problem_field / answer_field: the fields to read; by default the problem is the first of
    ``problem``, ``question``, ``prompt`` and the answer the first non-empty of ``answer``,
    ``final_answer``, else ``solution`` (a bare answer, ``\\boxed{X}``, or a worked solution
    whose last box is the answer). limit: keep the first `limit` problems.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    spec_str = os.fspath(spec)
    path = Path(spec_str).expanduser()
    if path.is_file():
        rows, source = _read_file(path), path.stem
    elif path.is_dir():
        rows, source = _read_dir(path, split), path.name
    elif spec_str in BENCHMARKS:
        file = benchmark_path(spec_str, benchmark_dir)
        rows, source = _read_file(file), spec_str
    elif _looks_like_path(spec_str):
        raise FileNotFoundError(f"no dataset file or directory at {spec_str!r}")
    else:
        rows, source = _read_hf(spec_str, split, hf_config), spec_str
    problems: list[Problem] = []
    for where, index, row in rows:
        if limit is not None and len(problems) >= limit:
            break
        problems.append(_row_to_problem(row, where, index, source, problem_field, answer_field))
    if not problems and limit != 0:
        raise DatasetError(f"{spec_str}: no problems found")
    return problems


def benchmark_path(name: str, benchmark_dir: str | os.PathLike | None = None) -> Path:
    """The file of bundled benchmark `name` (see `load_problems` for where it is looked up)."""
    if name not in BENCHMARKS:
        raise KeyError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    if benchmark_dir is not None:
        directory = Path(benchmark_dir)
    elif os.environ.get(BENCHMARK_DIR_ENV):
        directory = Path(os.environ[BENCHMARK_DIR_ENV])
    else:
        directory = packaged_benchmark_dir()
    file = directory / BENCHMARKS[name]
    if not file.is_file():
        raise FileNotFoundError(
            f"benchmark {name!r}: {BENCHMARKS[name]} not found in {directory}; "
            f"pass benchmark_dir= or set {BENCHMARK_DIR_ENV}"
        )
    return file


def packaged_benchmark_dir() -> Path:
    """The benchmark files installed with the package."""
    return Path(str(resources.files("cir") / "benchmarks"))


def _looks_like_path(spec: str) -> bool:
    return spec.lower().endswith(DATA_SUFFIXES) or spec.startswith((".", "/", "~"))


Row = tuple[str, int, Any]  # (location for messages, 0-based row index, the row)


def _read_file(path: Path) -> list[Row]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return list(_read_jsonl(path))
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    raise DatasetError(f"{path}: unsupported file type {suffix!r} (use {', '.join(DATA_SUFFIXES)})")


def _read_jsonl(path: Path) -> Iterator[Row]:
    index = 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
            yield f"{path}:{lineno}", index, row
            index += 1


def _read_json(path: Path) -> list[Row]:
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # JSON lines in a .json file
            return list(_read_jsonl(path))
        raise DatasetError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    if isinstance(data, dict):
        lists = [k for k, v in data.items() if isinstance(v, list)]
        if len(lists) != 1:
            raise DatasetError(
                f"{path}: expected a list of rows (or an object holding one list), found keys {sorted(data)}"
            )
        data = data[lists[0]]
    if not isinstance(data, list):
        raise DatasetError(f"{path}: expected a list of rows, found {type(data).__name__}")
    return [(f"{path} row {i}", i, row) for i, row in enumerate(data)]


def _read_parquet(path: Path) -> list[Row]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    table = pq.read_table(path)
    return [(f"{path} row {i}", i, row) for i, row in enumerate(table.to_pylist())]


def _read_dir(path: Path, split: str) -> list[Row]:
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in DATA_SUFFIXES)
    if not files:
        raise DatasetError(f"{path}: no {', '.join(DATA_SUFFIXES)} files in this directory")
    in_split = [p for p in files if p.name.startswith(split)]
    rows: list[Row] = []
    for file in in_split or files:
        for where, _, row in _read_file(file):
            rows.append((where, len(rows), row))
    return rows


def _read_hf(name: str, split: str, config: str | None) -> list[Row]:
    try:
        import datasets
    except ImportError:
        raise ImportError(
            f"{name!r} is not a file, a directory or a bundled benchmark ({', '.join(BENCHMARKS)}); "
            "loading it as a Hugging Face dataset needs the 'datasets' package: pip install datasets"
        ) from None
    ds = datasets.load_dataset(name, config, split=split)
    return [(f"{name} [{split}] row {i}", i, row) for i, row in enumerate(ds)]


def _row_to_problem(
    row: Any, where: str, index: int, source: str, problem_field: str | None, answer_field: str | None
) -> Problem:
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: expected a JSON object, found {type(row).__name__}")
    if problem_field is not None:
        if problem_field not in row:
            raise DatasetError(f"{where}: no problem field {problem_field!r}; fields present: {sorted(row)}")
        pfield = problem_field
    else:
        pfield = next((f for f in PROBLEM_FIELDS if f in row), None)
        if pfield is None:
            raise DatasetError(
                f"{where}: no problem field (looked for {', '.join(repr(f) for f in PROBLEM_FIELDS)}); "
                f"fields present: {sorted(row)}"
            )
    text = row[pfield]
    if not isinstance(text, str) or not text.strip():
        raise DatasetError(f"{where}: the problem field {pfield!r} is empty or not text ({text!r:.60})")
    try:
        answer = reference_answer(row, answer_field)
    except ValueError as exc:
        raise DatasetError(f"{where}: {exc}") from None
    id_field = next((f for f in ID_FIELDS if f in row and not _is_blank(row[f])), None)
    pid = str(row[id_field]) if id_field else f"{source}-{index}"
    meta = {k: v for k, v in row.items() if k != pfield and k != id_field}
    return Problem(id=pid, problem=text, answer=answer, source=source, meta=meta, where=where)


# ---------------------------------------------------------------------------------------------
# Prompts too long for the model

# The least room a prompt must leave in the model's context: one response token. The rollout
# needs it to start a trajectory (it refuses a prompt without it), so a prompt short of it would
# stop a run the first time the sampler draws it.
MIN_RESPONSE_TOKENS = 1


@dataclass(frozen=True)
class OverlongPrompt:
    problem: Problem
    tokens: int  # the prompt's length in tokens


def find_overlong(
    problems: Iterable[Problem], prompt_tokens: Callable[[Problem], int], max_model_len: int | None
) -> list[OverlongPrompt]:
    """The problems whose prompt (`prompt_tokens(problem)` tokens) leaves less than
    `MIN_RESPONSE_TOKENS` of the model's context (`max_model_len`, prompt + response; None: no
    limit) for a response."""
    if max_model_len is None:
        return []
    found = []
    for problem in problems:
        n = prompt_tokens(problem)
        if n + MIN_RESPONSE_TOKENS > max_model_len:
            found.append(OverlongPrompt(problem, n))
    return found


def overlong_message(overlong: list[OverlongPrompt], total: int, max_model_len: int, show: int = 3) -> str:
    """ "N of M prompts leave no room ...: <first rows>", each row by file and line (or id)."""
    rows = [
        f"{o.problem.where or 'problem ' + o.problem.id} (id {o.problem.id}, {o.tokens} tokens)"
        for o in overlong[:show]
    ]
    more = f" and {len(overlong) - show} more" if len(overlong) > show else ""
    return (
        f"{len(overlong)} of {total} prompts leave no room for a response in the model's context of "
        f"{max_model_len} tokens: {'; '.join(rows)}{more}"
    )


def drop_or_refuse_overlong(
    key: str,
    problems: list[Problem],
    prompt_tokens: Callable[[Problem], int],
    max_model_len: int | None,
    *,
    drop: bool,
    say: Callable[[str], None],
) -> list[Problem]:
    """`problems` checked with `find_overlong`: returned as they are when none is too long; else
    a `DatasetError` starting with `key` (``data.drop_overlong=false``), or (`drop`) the others,
    with a count through `say`. Dropping every problem is an error too."""
    overlong = find_overlong(problems, prompt_tokens, max_model_len)
    if not overlong:
        return problems
    message = f"{key}: {overlong_message(overlong, len(problems), max_model_len)}"
    if not drop:
        raise DatasetError(f"{message} (data.drop_overlong=true leaves them out)")
    if len(overlong) == len(problems):
        raise DatasetError(f"{message}: none left")
    say(f"{message}; left out (data.drop_overlong=true)")
    too_long = {id(o.problem) for o in overlong}
    return [p for p in problems if id(p) not in too_long]


# ---------------------------------------------------------------------------------------------
# Sampling


class ProblemSampler:
    """An endless, seeded stream of problems: each epoch a fresh permutation, drawn in order.

    The permutation of epoch ``e`` depends only on ``(seed, e)``, so the stream is fully
    described by ``(epoch, position)``: `state_dict` saves them, `load_state_dict` restores
    them and a resumed run continues with exactly the same problems. `take` draws any number
    from the same stream (dynamic sampling refills with it after dropping groups); `peek`
    looks ahead without drawing.
    """

    def __init__(self, problems: list[Problem], batch_size: int, seed: int = 0, shuffle: bool = True):
        if not problems:
            raise ValueError("ProblemSampler needs at least one problem")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.problems = list(problems)
        self.batch_size = batch_size
        self.seed = int(seed)
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0  # index into this epoch's order of the next problem to draw
        self._order_epoch = -1
        self._order: np.ndarray | None = None
        self._fingerprint = hashlib.sha1("\x00".join(p.id for p in self.problems).encode()).hexdigest()

    def _order_of(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.problems))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.problems))

    def _current_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            self._order, self._order_epoch = self._order_of(self.epoch), self.epoch
        return self._order

    def _walk(self, n: int, advance: bool) -> list[Problem]:
        if n < 0:
            raise ValueError(f"cannot draw {n} problems")
        epoch, position = self.epoch, self.position
        out: list[Problem] = []
        while len(out) < n:
            order = self._current_order() if epoch == self.epoch else self._order_of(epoch)
            step = min(n - len(out), len(order) - position)
            out.extend(self.problems[i] for i in order[position : position + step])
            position += step
            if position == len(order):
                epoch, position = epoch + 1, 0
        if advance:
            self.epoch, self.position = epoch, position
        return out

    def take(self, n: int) -> list[Problem]:
        """The next `n` problems of the stream (crossing into the next epoch as needed)."""
        return self._walk(n, advance=True)

    def peek(self, n: int) -> list[Problem]:
        """The next `n` problems, without drawing them."""
        return self._walk(n, advance=False)

    def next_batch(self) -> list[Problem]:
        return self.take(self.batch_size)

    def __iter__(self) -> Iterator[list[Problem]]:
        while True:
            yield self.next_batch()

    @property
    def batches_per_epoch(self) -> float:
        return len(self.problems) / self.batch_size

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_problems": len(self.problems),
            "fingerprint": self._fingerprint,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`; refuses one saved over other problems or another seed."""
        for key, mine in (
            ("num_problems", len(self.problems)),
            ("seed", self.seed),
            ("shuffle", self.shuffle),
            ("fingerprint", self._fingerprint),
        ):
            if key in state and state[key] != mine:
                raise ValueError(
                    f"sampler state was saved with {key}={state[key]!r} but this sampler has {key}={mine!r}: "
                    "resuming over a different problem set or seed would not continue the same stream"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < len(self.problems):
            raise ValueError(
                f"invalid sampler state: epoch={epoch}, position={position} for {len(self.problems)} problems"
            )
        self.epoch, self.position = epoch, position


def problems_to_rows(problems: Iterable[Problem]) -> list[dict[str, Any]]:
    """Problems as plain dicts (the ``problem`` field of a `Trajectory`)."""
    return [{**p.meta, "id": p.id, "problem": p.problem, "answer": p.answer, "source": p.source} for p in problems]
