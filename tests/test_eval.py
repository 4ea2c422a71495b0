"""Evaluation pieces: pass@k / maj@k against hand-computed values, answer groups, every benchmark
reference graded against an equivalent and a perturbed form, and `evaluate` grading the model's
own words (with a scripted engine and the real sandbox)."""

from __future__ import annotations

import asyncio
import re
from math import comb
from pathlib import Path

import pytest

from cir.data import BENCHMARKS, Problem, load_problems
from cir.engines.base import Completion
from cir.evaluation import evaluate
from cir.evaluation.grading import answer_groups
from cir.evaluation.metrics import ks_up_to, majority_correct, pass_at_k, summarise, trainer_summary
from cir.evaluation.report import markdown_report, terminal_table
from cir.prompts import PromptTemplate
from cir.rewards import RewardConfig, get_grader_pool, grade_outcomes
from cir.rollout import RolloutConfig
from cir.tokenization import byte_tokenizer

BENCHMARK_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "benchmarks"


@pytest.fixture(scope="module", autouse=True)
def warm_pool():
    get_grader_pool().start()
    yield


# ---------------------------------------------------------------------------------------------
# pass@k, maj@k


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (4, 2, 1, 0.5),
        (4, 2, 2, 1 - 1 / 6),  # 1 - C(2,2)/C(4,2)
        (4, 2, 3, 1.0),  # fewer wrong samples than k
        (4, 2, 4, 1.0),  # k = n: any correct sample
        (5, 1, 3, 0.6),  # 1 - C(4,3)/C(5,3) = 1 - 4/10
        (16, 3, 4, 1 - comb(13, 4) / comb(16, 4)),
        (4, 0, 4, 0.0),  # all wrong
        (4, 4, 1, 1.0),  # all correct
        (1, 1, 1, 1.0),
        (1, 0, 1, 0.0),
    ],
)
def test_pass_at_k_hand_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_rejects_impossible_counts_and_ks_are_powers_of_two_then_n():
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)
    assert ks_up_to(1) == [1]
    assert ks_up_to(4) == [1, 2, 4]
    assert ks_up_to(6) == [1, 2, 4, 6]
    assert ks_up_to(16) == [1, 2, 4, 8, 16]


def test_majority_vote_hand_values():
    groups, correct = [0, 1, 1, None, 1], [True, False, False, False, False]
    assert majority_correct(groups, correct, 1) is True
    assert majority_correct(groups, correct, 2) is True  # 1-1 tie: the group seen first wins
    assert majority_correct(groups, correct, 3) is False  # the wrong answer has 2 votes
    assert majority_correct(groups, correct, 5) is False  # k = n
    assert majority_correct([None, None], [False, False], 2) is False  # no answers at all
    assert majority_correct([0, 0, 0], [True, True, True], 3) is True  # all correct
    assert majority_correct([0, 1, 2], [False, False, False], 3) is False  # all wrong
    # A missing answer is no vote: one correct answer beats three samples without one.
    assert majority_correct([None, None, 0, None], [False, False, True, False], 4) is True


def test_answer_groups_merge_equivalent_forms_and_correct_answers():
    labels = answer_groups(
        [
            (["0.5", r"\frac{1}{2}", "3", r"\dfrac12", None], [False] * 5),  # reference elsewhere: all wrong
            (["7", "7.0", "8", r"\frac{14}{2}"], [True, True, False, True]),
            ([None, ""], [False, False]),
        ]
    )
    assert labels == [[0, 0, 1, 0, None], [0, 0, 1, 0], [None, None]]


def _row(pid, sample, correct, tool_calls=0, **kw):
    row = {
        "id": pid,
        "sample": sample,
        "correct": correct,
        "reward": 1.0 if correct else -1.0,
        "tool_calls": tool_calls,
        "exec_errors": 0,
        "timeouts": 0,
        "model_tokens": 10,
        "feedback_tokens": 5 * tool_calls,
        "finish_reason": "eos",
        "extracted_answer": "1" if correct else None,
        "answer_only_in_tool_output": False,
        "meta": {},
    }
    row.update(kw)
    return row


def test_summary_from_rows_hand_values():
    rows = [
        _row("a", 0, True, tool_calls=1),
        _row("a", 1, False, tool_calls=2, exec_errors=1, timeouts=1),
        _row("a", 2, True),
        _row("a", 3, False, finish_reason="length"),
        _row("b", 0, False),
        _row("b", 1, False, tool_calls=1),
        _row("b", 2, False),
        _row("b", 3, False),
    ]
    groups = {"a": [0, 1, 0, 1], "b": [None, 0, 1, 0]}
    m = summarise(rows, temperature=1.0, groups=groups)
    assert m["problems"] == 2 and m["samples"] == 4 and m["protocol"] == "avg@4"
    assert m["score"] == m["avg@4"] == m["accuracy"] == pytest.approx(2 / 8)
    assert m["pass@k"] == pytest.approx({"1": 0.25, "2": (5 / 6 + 0) / 2, "4": 0.5})
    assert m["maj@k"] == pytest.approx({"1": 0.5, "2": 0.5, "4": 0.5})  # a: 2-2 tie, the first group (correct)
    assert m["tool_calls"] == pytest.approx(4 / 8)
    assert m["tool_use_rate"] == pytest.approx(3 / 8)
    assert m["exec_error_rate"] == pytest.approx(1 / 4) and m["timeout_rate"] == pytest.approx(1 / 4)
    assert m["accuracy_with_tool"] == pytest.approx(1 / 3)
    assert m["accuracy_without_tool"] == pytest.approx(1 / 5)
    assert m["correct_with_tool_share"] == pytest.approx(1 / 2)
    assert m["truncation_rate"] == pytest.approx(1 / 8)
    assert m["feedback_tokens"] == pytest.approx(20 / 8)


def test_faulted_samples_are_left_out_of_every_number_and_counted_apart():
    # A sample the machine failed (sandbox fault, grader timeout) is not a wrong answer: with it
    # scored as wrong, a's accuracy would be 2/4 and its pass@1 0.5.
    rows = [
        _row("a", 0, True, tool_calls=1),
        _row("a", 1, False, fault="sandbox", tool_calls=3, exec_errors=3),
        _row("a", 2, True),
        _row("a", 3, False, fault="grader_timeout", extracted_answer="9^{9^{9}}"),
        _row("b", 0, False),
        _row("b", 1, True, tool_calls=1),
        _row("b", 2, False),
        _row("c", 0, False, fault="sandbox"),  # no graded sample: not a problem of the score
    ]
    groups = {"a": [0, None, 0, 1], "b": [0, 1, 0], "c": [None]}
    m = summarise(rows, temperature=1.0, groups=groups)
    assert m["faults"] == {"sandbox": 2, "grader": 1}
    assert m["problems"] == 2 and m["samples"] == 2 and m["protocol"] == "avg@2"
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["avg@2"] == pytest.approx((1.0 + 1 / 3) / 2)
    assert m["pass@k"] == pytest.approx({"1": (1.0 + 1 / 3) / 2, "2": (1.0 + 2 / 3) / 2})
    assert m["maj@k"] == pytest.approx({"1": 0.5, "2": 0.5})  # b: 0 vs 1 tie at k=2, the first (wrong) wins
    assert m["tool_calls"] == pytest.approx(2 / 5) and m["exec_error_rate"] == 0.0
    # Without faults the same rows are what they were.
    clean = [r for r in rows if not r.get("fault")]
    assert summarise(clean, temperature=1.0)["faults"] == {"sandbox": 0, "grader": 0}

    flat = trainer_summary(rows)
    assert flat["accuracy"] == pytest.approx(3 / 5) and flat["count"] == 5.0
    assert (flat["faults_sandbox"], flat["faults_grader"]) == (2.0, 1.0)

    results = {
        "settings": {
            "model": "m",
            "prompt": "cir",
            "tool_budget": 4,
            "max_response_tokens": 64,
            "engine": "hf",
            "seed": 0,
            "grade_tool_output": False,
        },
        "benchmarks": {"set": {**m, "by": {}}},
        "overall": {},
    }
    assert "| 3 (sandbox 2, grader 1) |" in markdown_report(results)
    assert terminal_table(results).splitlines()[-1].split()[-1] == "3"


# ---------------------------------------------------------------------------------------------
# Every reference answer of the benchmark files, graded


def _equivalent_form(ref: str) -> str:
    """`ref` written another way where one is at hand (else `ref` itself)."""
    if re.fullmatch(r"-?\d+", ref):
        return rf"\frac{{{2 * int(ref)}}}{{2}}"
    m = re.fullmatch(r"\\[dt]?frac\{(\d+)\}\{(\d+)\}", ref)
    if m:
        num, den = int(m[1]), int(m[2])
        rest = den
        for p in (2, 5):
            while rest % p == 0:
                rest //= p
        if rest == 1:
            return repr(num / den)  # \frac{1}{2} -> 0.5
    if "\\dfrac" in ref or "\\tfrac" in ref:
        return ref.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    if "," in ref:
        return re.sub(r",\s*", ", ", ref)  # a tuple, interval or list with spaces
    return ref


def _perturbed(ref: str) -> str:
    """`ref` with its first digit changed (or "+1" appended): a different answer."""
    m = re.search(r"\d", ref)
    if m:
        return ref[: m.start()] + str((int(m[0]) + 1) % 10) + ref[m.end() :]
    return ref + "+1"


def test_every_benchmark_reference_grades_right_against_an_equivalent_and_wrong_against_a_perturbed_form():
    pairs, where = [], []
    rewritten = 0
    for name in BENCHMARKS:
        for p in load_problems(name, benchmark_dir=BENCHMARK_DIR):
            equivalent = _equivalent_form(p.answer)
            rewritten += equivalent != p.answer
            pairs += [(equivalent, p.answer), (_perturbed(p.answer), p.answer)]
            where += [(name, p.id, True), (name, p.id, False)]
    assert len(where) == 2 * 800 and rewritten > 500
    outcomes = grade_outcomes(pairs, timeout_s=10.0)  # one batch through the grader pool
    wrong = [(w, pair, o.reason) for w, pair, o in zip(where, pairs, outcomes) if o.correct != w[2]]
    assert not wrong, wrong[:10]


# ---------------------------------------------------------------------------------------------
# evaluate() grades the model's own words


class ScriptedEngine:
    """Answers each problem with a fixed script: one segment per generate call (the rollout
    appends the interpreter's output between them). Byte tokenizer: one token per byte."""

    max_model_len = None

    def __init__(self, tokenizer, scripts: dict[str, list[str]]):
        self._tokenizer = tokenizer
        self.scripts = scripts

    @property
    def tokenizer(self):
        return self._tokenizer

    async def generate(self, prompt_ids, params):
        await asyncio.sleep(0)
        text = self._tokenizer.decode(prompt_ids)
        (script,) = [s for key, s in self.scripts.items() if key in text]
        segment = script[text.count("```output")]
        ids = self._tokenizer.encode(segment, add_special_tokens=False)[: params.max_new_tokens]
        last = segment.endswith("<|endoftext|>")
        return Completion(ids, [0.0] * len(ids), "stop_token" if last else "stop_rule")


def test_a_box_only_the_code_printed_is_not_credited_unless_asked(tmp_path):
    from cir.sandbox import Sandbox

    tok = byte_tokenizer()
    code = "```python\nprint(r'\\boxed{' + str(3 + 4) + '}')\n```"
    scripts = {
        "P-silent": ["Compute.\n" + code, "Done.<|endoftext|>"],
        "P-restated": ["Compute.\n" + code, "So $\\boxed{7}$.<|endoftext|>"],
        "P-error": ["Try.\n```python\n1/0\n```", "Hmm, \\boxed{8}.<|endoftext|>"],
    }
    problems = [Problem(id=k, problem=k, answer="7", source="t") for k in scripts]
    template = PromptTemplate("t", system="", user_format="{problem}\n")
    engine = ScriptedEngine(tok, scripts)
    written = []
    with Sandbox(workers=2) as sandbox:
        run = lambda grade_tool_output: evaluate(  # noqa: E731
            engine,
            sandbox,
            problems,
            template=template,
            rollout_config=RolloutConfig(max_response_tokens=512, tool_budget=2),
            reward_config=RewardConfig(grade_tool_output=grade_tool_output),
            on_problem=written.append,
        )
        own, with_output = run(False), run(True)
    rows = {r["id"]: r for r in own.rows}
    assert [r["correct"] for r in own.rows] == [False, True, False]
    assert rows["P-silent"]["answer_only_in_tool_output"] and not rows["P-restated"]["answer_only_in_tool_output"]
    assert rows["P-silent"]["extracted_answer"] is None and rows["P-restated"]["extracted_answer"] == "7"
    assert [r["correct"] for r in with_output.rows] == [True, True, False]
    # The row holds the response in order, the interpreter's output marked as such.
    silent = rows["P-silent"]
    assert [s["source"] for s in silent["segments"]] == ["model", "interpreter", "model"]
    assert silent["segments"][1]["text"] == "\n```output\n\\boxed{7}\n```\n"
    assert "".join(s["text"] for s in silent["segments"]) == silent["response"]
    assert silent["calls"][0]["status"] == "ok" and rows["P-error"]["calls"][0]["status"] == "error"
    assert rows["P-error"]["exec_errors"] == 1 and own.metrics["exec_error_rate"] == pytest.approx(1 / 3)
    # Each finished problem was handed over once per run, with its grade.
    assert sorted(r["id"] for batch in written for r in batch) == sorted([*scripts, *scripts])
    assert all("correct" in r and "_grading" not in r for batch in written for r in batch)


def test_a_grader_fault_in_evaluate_is_counted_not_scored_wrong_and_drawn_again_on_rerun():
    from cir.sandbox import Sandbox

    tok = byte_tokenizer()
    scripts = {
        "P-right": ["So $\\boxed{7}$.<|endoftext|>"],
        "P-wrong": ["So $\\boxed{8}$.<|endoftext|>"],
        # 9^(9^9) keeps a math-verify worker busy past any deadline: every try times out.
        "P-hang": ["So $\\boxed{9^{9^{9}}}$.<|endoftext|>"],
    }
    problems = [Problem(id=k, problem=k, answer="7", source="t") for k in scripts]
    template = PromptTemplate("t", system="", user_format="{problem}\n")
    config = dict(
        template=template,
        rollout_config=RolloutConfig(max_response_tokens=64, tool_budget=1),
        reward_config=RewardConfig(grader_timeout_s=0.3),
    )
    with Sandbox(workers=1) as sandbox:
        first = evaluate(ScriptedEngine(tok, scripts), sandbox, problems, **config)
        rows = {r["id"]: r for r in first.rows}
        assert [(rows[k]["correct"], rows[k]["fault"]) for k in scripts] == [
            (True, None),
            (False, None),
            (False, "grader_timeout"),
        ]
        # Not a wrong answer: the trainer's numbers are those of the two graded samples.
        assert first.metrics["accuracy"] == 0.5 and first.metrics["count"] == 2.0
        assert first.metrics["faults_grader"] == 1.0
        # A rerun over the same samples file keeps the graded samples and draws the faulted one again.
        again = evaluate(
            ScriptedEngine(tok, scripts), sandbox, problems, done={(r["id"], 0): r for r in first.rows}, **config
        )
    assert again.reused == 2 and [r["id"] for r in again.rows] == list(scripts)
    assert {r["id"]: r["fault"] for r in again.rows}["P-hang"] == "grader_timeout"
