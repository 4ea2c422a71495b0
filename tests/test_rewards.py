"""Rewards: boxed-answer extraction, math-verify grading in worker processes, reward shaping."""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import cir.rewards
from cir.rewards import (
    GraderCounters,
    GraderPool,
    RewardConfig,
    RewardResult,
    answer_only_in_tool_output,
    compute_rewards,
    extract_all_boxed,
    extract_boxed,
    get_grader_pool,
    get_reward,
    grade,
    grade_batch,
    grade_outcomes,
    grader_counters,
    grading_form,
    grading_text,
    has_unclosed_code_block,
    model_text,
    overlong_penalty,
    plain_number,
    register_reward,
    reward_info_from_trajectory,
    score_trajectories,
    without_code_blocks,
)
from cir.tokenization import byte_tokenizer
from cir.trajectory import SANDBOX_FAULT, ToolCall, Trajectory

LABELS = Path(__file__).parent / "data" / "grading_labels.jsonl"


@pytest.fixture(scope="module", autouse=True)
def warm_pool():
    """Start the shared grading workers once for the module (importing math-verify takes ~1-2 s)."""
    get_grader_pool().start()
    yield


# ---------------------------------------------------------------------------------------------
# The package


def test_package_exports_every_public_name_of_its_modules():
    from cir.rewards import answers, grader, registry

    public = {
        name
        for module in (answers, grader, registry)
        for name, value in vars(module).items()
        if not name.startswith("_") and getattr(value, "__module__", None) == module.__name__
    }
    assert public <= set(cir.rewards.__all__)
    for name in cir.rewards.__all__:
        module = {"answers": answers, "grader": grader, "registry": registry}[
            cir.rewards._LAZY_NAMES.get(name, "answers")
        ]
        assert getattr(cir.rewards, name) is getattr(module, name), name


def test_answers_import_without_grader_or_registry():
    # Data loading reads references with `cir.rewards.answers` and must not pull in the grader.
    code = (
        "import sys, cir.rewards.answers; "
        "print(sorted(m for m in sys.modules if m.startswith('cir.rewards') or m == 'math_verify'))"
    )
    root = str(Path(cir.rewards.__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['cir.rewards', 'cir.rewards.answers']"


# ---------------------------------------------------------------------------------------------
# Extraction


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so the answer is $\boxed{42}$.", "42"),
        (r"\boxed{\frac{a^{2}}{b_{1}}}", r"\frac{a^{2}}{b_{1}}"),
        (r"first \boxed{1} then \boxed{2}", "2"),
        (r"\fbox{x+1}", "x+1"),
        (r"The answer is $\boxed 5$.", "5"),
        (r"The answer is \boxed 5.", "5"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
        (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)"),
        (r"\boxed{\boxed{7}}", "7"),
        (r"\boxed { 8 }", "8"),
        (r"\boxed{\text{(C)}}", r"\text{(C)}"),
        ("no box here", None),
        (r"\boxedfoo{3}", None),
        (r"\boxed{3} and then \boxed{\frac{1}{2", None),  # last box never closed: no answer
        (r"\boxed{ \boxed{3}", "3"),  # an unclosed box before a closed one
        ("\\boxed", None),
        ("so \\boxed\n{42}.", "42"),  # a line break before the brace
        ("\\boxed \r\n\n {7}", "7"),
        ("\\boxed\nThe answer", None),  # no brace after the line break: not a box
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_extract_all_boxed_counts_nested_once_and_skips_unclosed():
    text = r"\boxed{1} \fbox{2} \boxed{\frac{3}{\boxed{4}}} \boxed 5 \boxed{6"
    assert extract_all_boxed(text) == ["1", "2", r"\frac{3}{\boxed{4}}", "5"]
    assert extract_all_boxed("nothing") == []


def test_boxes_in_any_fenced_block_are_code_and_output_blocks_stay_when_asked():
    text = (
        "a\n```python3\nprint(r'\\boxed{1}')\n```\nb\n```\n\\boxed{2}\n```\n"
        "```output\n\\boxed{3}\n```\nc \\boxed{4}\n```latex\n\\boxed{5}"  # the last block is cut off
    )
    assert extract_all_boxed(without_code_blocks(text)) == ["4"]
    assert extract_all_boxed(without_code_blocks(text, keep_output=True)) == ["3", "4"]
    assert without_code_blocks("inline ```x``` stays") == "inline ```x``` stays"


@pytest.mark.parametrize(
    "answer, form",
    [
        (r"\text{204 minutes}", "204"),
        ("2000 calories", "2000"),
        (r"\mbox{15 cm}^2", "15"),
        (r"864 \mbox{ inches}^2", "864"),
        (r"\frac{270}7\text{ degrees}", r"\frac{270}7"),
        (r"10\,\%", r"10 \%"),
        (r"1\,000\,000", "1000000"),
        ("30°", r"30^{\circ}"),
        ("100 °C", r"100^{\circ}"),
        ("6.72e-05", r"6.72\times10^{-05}"),
        ("\u22123", "-3"),
        # Kept as written: words that change the value, lone letters, bare words that are no unit.
        (r"\text{5 or more}", r"\text{5 or more}"),
        (r"2\text{ x}", r"2\text{ x}"),
        ("2 ab", "2 ab"),
        (r"\text{(C)}", r"\text{(C)}"),
        (r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}"),
    ],
)
def test_grading_form(answer, form):
    assert grading_form(answer) == form


def test_plain_numbers_are_exact():
    assert plain_number("6.72e-05") == plain_number(".0000672") == plain_number(r"6.72\times 10^{-5}")
    assert plain_number("0.0000673") != plain_number("6.72e-05")
    assert plain_number("1.0000000000000000000000000000001") != plain_number("1")  # no rounding
    assert plain_number(r"\frac{1}{2}") is None and plain_number("2e") is None and plain_number("1e99999") is None


def test_unclosed_code_block_detection():
    assert has_unclosed_code_block("text\n```python\nx = 1\n")
    assert not has_unclosed_code_block("```python\nx = 1\n```\n```output\n1\n```\n")
    assert has_unclosed_code_block("```python\nx=1\n```\n```output\n1\n```\nmore\n```python\ny=2")
    assert not has_unclosed_code_block("no code at all ``` here")


# ---------------------------------------------------------------------------------------------
# Grading

EQUIVALENT = [
    ("0.5", r"\frac{1}{2}"),
    ("1/2", r"\frac{1}{2}"),
    (r"\dfrac{1}{2}", r"\frac12"),
    (r"\frac{18}{5}", "3.6"),
    ("(1,2)", "(1, 2)"),
    ("[0,1)", "[0, 1)"),
    (r"\sqrt{12}", r"2\sqrt{3}"),
    (r"-14+4\sqrt{15}", r"4\sqrt{15}-14"),
    (r"\pi/2", r"\frac{\pi}{2}"),
    (r"(3,\frac{\pi}{2})", r"\left( 3, \frac{\pi}{2} \right)"),
    ("5", r"5\text{ cm}"),
    (r"5\text{ cm}", "5"),
    ("10", r"10\%"),
    (r"30^\circ", "30"),
    ("C", r"\text{(C)}"),
    (r"\text{(C)}", r"\text{(C)}"),
    ("-3", "-3"),
    ("-0.25", r"-\frac{1}{4}"),
    ("1+x^2", "x^2+1"),
]

NOT_EQUIVALENT = [
    ("0.6", r"\frac{1}{2}"),
    ("(2,1)", "(1,2)"),
    ("(0,1]", "[0, 1)"),
    (r"\sqrt{13}", r"2\sqrt{3}"),
    (r"2\pi", r"\pi"),
    ("3", "-3"),
    (r"\text{(D)}", r"\text{(C)}"),
    ("7", r"5\text{ cm}"),
    ("x^2-1", "x^2+1"),
]


@pytest.mark.parametrize("prediction, reference", EQUIVALENT)
def test_grade_equivalent(prediction, reference):
    assert grade(prediction, reference) is True


@pytest.mark.parametrize("prediction, reference", NOT_EQUIVALENT)
def test_grade_not_equivalent(prediction, reference):
    assert grade(prediction, reference) is False


def test_grade_batch_matches_single_grading_and_reports_reasons():
    pairs = EQUIVALENT[:6] + NOT_EQUIVALENT[:6] + [(None, "3"), ("", "3"), ("42", "42")]
    expected = [True] * 6 + [False] * 6 + [False, False, True]
    assert grade_batch(pairs) == expected
    outcomes = grade_outcomes(pairs)
    reasons = [o.reason for o in outcomes]
    assert reasons[-3:] == ["no_answer", "no_answer", "exact_match"]
    assert reasons[0] == "equivalent" and reasons[6] == "not_equivalent"


def test_reference_forms_bare_boxed_and_worked_solution():
    worked = r"We have $r = 3$ and $\theta = \frac{\pi}{2}$, so the point is $\boxed{\left( 3, \frac{\pi}{2} \right)}.$"
    assert grade(r"(3, \pi/2)", worked)
    assert grade("204", r"\boxed{204}")
    assert grade("204", "204")
    assert not grade("205", r"\boxed{204}")
    # A prediction still holding a box is reduced to its last box.
    assert grade(r"the answer is \boxed{204}", "204")


def test_grading_from_threads_and_asyncio():
    results: list[bool] = []
    thread = threading.Thread(target=lambda: results.append(grade("0.5", r"\frac{1}{2}")))
    thread.start()
    thread.join(timeout=60)
    assert results == [True]

    with concurrent.futures.ThreadPoolExecutor(4) as ex:
        got = list(ex.map(lambda pair: grade(*pair), EQUIVALENT[:4] + NOT_EQUIVALENT[:4]))
    assert got == [True] * 4 + [False] * 4

    async def grade_async(pred, ref):
        return (await asyncio.wrap_future(get_grader_pool().submit(pred, ref, 5.0))).correct

    async def main():
        return await asyncio.gather(grade_async(r"\sqrt{8}", r"2\sqrt{2}"), grade_async("1", "2"))

    assert asyncio.run(main()) == [True, False]


def test_hanging_grader_is_killed_retried_then_a_fault():
    # 9^(9^9) is a ~370-million-digit integer: sympy computes it in C, which neither
    # math-verify's signal alarm nor anything but killing the process can interrupt.
    before = grader_counters()
    with GraderPool(num_workers=1, max_retries=2, retry_backoff_s=0.05) as pool:
        pool.start()
        assert pool.submit("1+1", "2", 60).result(timeout=120).correct  # worker up and grading
        pid_before = pool.worker_pids
        start = time.monotonic()
        outcome = pool.submit("9^{9^{9}}", "3", 0.5).result(timeout=60)
        elapsed = time.monotonic() - start
        # Tried three times, each on a fresh worker, then given up: a fault, not a verdict.
        assert (outcome.reason, outcome.fault) == ("grader_timeout", "grader_timeout")
        assert elapsed < 15.0, f"timed-out request took {elapsed:.1f} s"
        assert pool.counters() == GraderCounters(retries=2, timeouts=1, crashes=0, restarts=3)
        assert pool.restarts == 3
        assert pool.worker_pids != pid_before
        # The replacement worker grades normally.
        assert pool.submit(r"\frac{2}{4}", "0.5", 30).result(timeout=120).correct
    # The process-wide counters saw the same (the trainer logs such a difference per step).
    step = grader_counters() - before
    assert (step.retries, step.timeouts, step.faults) == (2, 1, 1) and step.restarts >= 3
    assert step.as_metrics()["grader/faults"] == 1.0


def _worker_busy(pool: GraderPool, not_pid: int | None = None, timeout_s: float = 30.0) -> int:
    """The pid of the pool's worker once it holds a request (test fault injection), other than
    `not_pid` (one already killed, until the pool notices)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        busy = [w.proc.pid for w in pool._workers if w.state == "busy" and w.proc.pid != not_pid]
        if busy:
            return busy[0]
        time.sleep(0.01)
    raise AssertionError("no worker took the request")


def test_a_worker_lost_mid_request_is_replaced_and_the_request_graded_on_the_next():
    # The machine's faults pass: a worker killed (e.g. by the OOM killer) or frozen (starved of
    # CPU past the deadline) while grading; the retry on a fresh worker gives the verdict.
    with GraderPool(num_workers=1, max_retries=2, retry_backoff_s=0.05) as pool:
        assert pool.submit("1+1", "2", 60).result(timeout=120).correct
        pid = pool.worker_pids[0]
        os.kill(pid, signal.SIGSTOP)  # frozen: it cannot reply to what comes next
        future = pool.submit(r"\frac{2}{4}", "0.5", 60)
        assert _worker_busy(pool) == pid
        os.kill(pid, signal.SIGKILL)
        outcome = future.result(timeout=120)
        assert (outcome.correct, outcome.reason, outcome.fault) == (True, "equivalent", None)
        assert pool.counters() == GraderCounters(retries=1, timeouts=0, crashes=0, restarts=1)

        pid = pool.worker_pids[0]
        os.kill(pid, signal.SIGSTOP)  # frozen past the deadline: a timeout, retried
        outcome = pool.submit(r"\frac{3}{4}", "0.75", 1.0).result(timeout=120)
        assert (outcome.correct, outcome.fault) == (True, None)
        assert pool.counters() == GraderCounters(retries=2, timeouts=0, crashes=0, restarts=2)


def test_a_worker_lost_on_every_try_is_a_grader_crash():
    with GraderPool(num_workers=1, max_retries=1, retry_backoff_s=0.05) as pool:
        future = pool.submit("9^{9^{9}}", "3", 60)  # hangs: each try is still running when killed
        killed = None
        for _ in range(2):
            killed = _worker_busy(pool, not_pid=killed)
            os.kill(killed, signal.SIGKILL)
        outcome = future.result(timeout=120)
        assert (outcome.correct, outcome.reason, outcome.fault) == (False, "grader_crashed", "grader_crash")
        assert pool.counters() == GraderCounters(retries=1, timeouts=0, crashes=1, restarts=2)


def test_hanging_grader_in_batch_does_not_spoil_the_others():
    with GraderPool(num_workers=2) as pool:
        outs = grade_outcomes([("9^{9^{9}}", "3"), ("0.25", r"\frac14"), ("2", "3")], timeout_s=1.0, pool=pool)
    assert [(o.correct, o.reason) for o in outs] == [
        (False, "grader_timeout"),
        (True, "equivalent"),
        (False, "not_equivalent"),
    ]


def test_math_reward_grader_timeout_is_a_fault_not_a_wrong_answer():
    rs = compute_rewards(
        "math", [r"\boxed{9^{9^{9}}}", r"\boxed{3}"], ["3", "3"], None, RewardConfig(grader_timeout_s=0.5)
    )
    assert [(r.reward, r.correct, r.fault, r.info["reason"]) for r in rs] == [
        (0.0, False, "grader_timeout", "grader_timeout"),
        (1.0, True, None, "exact_match"),
    ]
    assert rs[0].info["answer"] == "9^{9^{9}}"
    assert grade(r"\frac{6}{2}", "3")  # the shared pool replaced the killed worker and grades on


def test_grader_memory_limit_is_applied_to_workers():
    limits_file = "/proc/{pid}/limits"
    with GraderPool(num_workers=1, memory_limit_mb=1536) as pool:
        assert pool.submit(r"\frac{4}{2}", "2", 30).result(timeout=120).correct  # through a worker
        (pid,) = pool.worker_pids
        try:
            limits = open(limits_file.format(pid=pid)).read()
        except FileNotFoundError:
            pytest.skip("no /proc on this system")
    line = next(row for row in limits.splitlines() if row.startswith("Max address space"))
    assert line.split()[3:5] == [str(1536 << 20), str(1536 << 20)], line


# ---------------------------------------------------------------------------------------------
# The "math" reward


def test_math_reward_paper_default():
    rs = compute_rewards(
        "math",
        [r"... so $\boxed{\dfrac{1}{2}}$", r"... $\boxed{3}$", "I give up"],
        ["0.5", "4", "4"],
    )
    assert [(r.reward, r.correct) for r in rs] == [(1.0, True), (-1.0, False), (-1.0, False)]
    assert rs[2].info["reason"] == "no_answer" and rs[2].info["answer"] is None
    assert rs[0].info["answer"] == r"\dfrac{1}{2}"


def test_math_reward_format_penalties():
    cfg = RewardConfig(
        no_box_penalty=0.5, multi_box_penalty=0.25, unclosed_code_penalty=0.125, tool_budget_penalty=0.0625
    )
    responses = [
        "no final answer",
        r"maybe \boxed{3}, no: \boxed{4}",  # two distinct boxes, the last is right
        r"\boxed{4} so again \boxed{4}",  # the same answer twice: no penalty
        r"\boxed{4}```python" + "\nprint(1)",  # left a python block open
        r"\boxed{4}",  # tried to use the tool after the budget was spent
    ]
    infos = [{}, {}, {}, {}, {"finish_reason": "budget"}]
    rs = compute_rewards("math", responses, ["4"] * 5, infos, cfg)
    assert [r.reward for r in rs] == [-1.5, 0.75, 1.0, 0.875, 0.9375]
    assert [r.correct for r in rs] == [False, True, True, True, True]
    assert rs[1].info["num_distinct_boxes"] == 2 and rs[1].info["penalties"] == {"multi_box": 0.25}
    # Without the penalty configured, the last box still decides.
    plain = compute_rewards("math", [responses[1]], ["3"])[0]
    assert plain.reward == -1.0 and not plain.correct


def test_math_reward_custom_values():
    cfg = RewardConfig(correct_reward=1.0, wrong_reward=0.0)
    rs = compute_rewards(None, [r"\boxed{7}", r"\boxed{8}"], ["7", "7"], None, cfg)
    assert [r.reward for r in rs] == [1.0, 0.0]


@pytest.mark.parametrize(
    "length, expected",
    # L = 100, B = 20: free up to 80 tokens, then -penalty * (n - 80) / 20, clamped at -penalty.
    [(10, 0.0), (80, 0.0), (81, -0.05), (90, -0.5), (95, -0.75), (100, -1.0), (130, -1.0)],
)
def test_overlong_penalty_values(length, expected):
    assert overlong_penalty(length, 100, 20, 1.0) == pytest.approx(expected, abs=1e-12)


def test_overlong_penalty_in_reward():
    cfg = RewardConfig(overlong_buffer=20, overlong_penalty=0.5)
    infos = [{"response_length": n, "max_response_length": 100} for n in (50, 90, 100)]
    rs = compute_rewards("math", [r"\boxed{1}", r"\boxed{1}", r"\boxed{2}"], ["1", "1", "1"], infos, cfg)
    assert [r.reward for r in rs] == pytest.approx([1.0, 0.75, -1.5])
    with pytest.raises(KeyError, match="max_response_length"):
        compute_rewards("math", [r"\boxed{1}"], ["1"], [{"response_length": 5}], cfg)
    with pytest.raises(ValueError, match="larger than the length limit"):
        overlong_penalty(10, 100, 200, 1.0)


def test_reward_info_from_trajectory():
    traj = Trajectory(prompt_ids=[1, 2])
    traj.append([5, 6, 7], None, trainable=True)
    traj.append([8, 9], None, trainable=False)  # interpreter feedback
    traj.append([10], None, trainable=True)
    traj.tool_calls.append(
        ToolCall(code="x", status="budget_exhausted", output="", code_span=(0, 3), feedback_span=(3, 5))
    )
    traj.finish_reason = "eos"
    info = reward_info_from_trajectory(traj, max_response_length=64)
    assert info["response_length"] == 4
    assert info["max_response_length"] == 64
    assert info["budget_exhausted"] is True
    # A budget notice is not an execution.
    assert info["num_tool_calls"] == 0
    traj.tool_calls.insert(
        0, ToolCall(code="print(1)", status="ok", output="1", code_span=(0, 3), feedback_span=(3, 5))
    )
    assert reward_info_from_trajectory(traj, max_response_length=64)["num_tool_calls"] == 1


def test_score_trajectories_equals_compute_rewards_and_leaves_trajectories_alone():
    tok = byte_tokenizer()

    def trajectory(segments, finish_reason, calls=()):
        # segments: (text, sampled by the model?); feedback segments are masked out of the length.
        traj = Trajectory(prompt_ids=tok.encode("Q", add_special_tokens=False))
        for text, sampled in segments:
            traj.append(tok.encode(text, add_special_tokens=False), None, trainable=sampled)
        traj.tool_calls.extend(calls)
        traj.finish_reason = finish_reason
        return traj

    code, feedback = "```python\nprint(2)\n```\n", "```output\n2\n```\n"
    # One token per byte: the spans are character offsets.
    ran = ToolCall("print(2)", "ok", "2", code_span=(0, len(code)), feedback_span=(len(code), len(code + feedback)))
    notice = ToolCall(code="x", status="budget_exhausted", output="", code_span=(0, 0), feedback_span=(0, 0))
    trajs = [
        trajectory([(code, True), (feedback, False), (r"so $\boxed{2}$.", True)], "eos", [ran]),
        trajectory([(r"maybe \boxed{3}, no: \boxed{\frac{4}{2}}", True)], "budget", [notice]),
        trajectory([("x" * 60 + "```python\nprint(", True)], "length"),
        trajectory([("no answer", True)], "eos"),
    ]
    answers = ["2", "2", "2", "2"]
    cfg = RewardConfig(
        no_box_penalty=0.5,
        multi_box_penalty=0.25,
        unclosed_code_penalty=0.125,
        tool_budget_penalty=0.0625,
        overlong_buffer=16,
        overlong_penalty=1.0,
    )
    for t in trajs:
        t.check()
    before = copy.deepcopy(trajs)

    results = score_trajectories(trajs, answers, tok, cfg, max_response_tokens=64)

    # Graded on the model's own words (the feedback spans left out; issue 11: the full decoded
    # text, output blocks included, was the flaw).
    direct = compute_rewards(
        None, [model_text(t, tok) for t in trajs], answers, [reward_info_from_trajectory(t, 64) for t in trajs], cfg
    )
    assert results == direct
    assert [r.correct for r in results] == [True, True, False, False]
    assert results[0].info["penalties"] == {} and results[0].reward == 1.0  # feedback tokens are not length
    assert results[1].info["penalties"] == {"multi_box": 0.25, "tool_budget": 0.0625}
    assert set(results[2].info["penalties"]) == {"no_box", "unclosed_code", "overlong"}
    assert trajs == before  # rewards are the caller's to store
    with pytest.raises(ValueError, match="lengths differ"):
        score_trajectories(trajs, answers[:2], tok, cfg, max_response_tokens=64)


def _tool_printed_box_trajectory(tok, restated: str):
    """The code prints the answer in a box; the model then writes `restated` (maybe nothing)."""
    code, feedback = "```python\nprint(r'\\boxed{7}')\n```\n", "```output\n\\boxed{7}\n```\n"
    traj = Trajectory(prompt_ids=tok.encode("Q", add_special_tokens=False))
    code_span = traj.append(tok.encode("Let me compute.\n" + code, add_special_tokens=False), None, trainable=True)
    fb_span = traj.append(tok.encode(feedback, add_special_tokens=False), None, trainable=False)
    traj.append(tok.encode(restated + "<|endoftext|>", add_special_tokens=False), None, trainable=True)
    traj.tool_calls.append(ToolCall("print(r'\\boxed{7}')", "ok", "\\boxed{7}", code_span, fb_span))
    traj.finish_reason = "eos"
    traj.check()
    return traj


def test_box_printed_by_code_is_not_the_models_answer_unless_asked():
    tok = byte_tokenizer()
    silent = _tool_printed_box_trajectory(tok, "Done.")
    restated = _tool_printed_box_trajectory(tok, "So the answer is $\\boxed{7}$.")
    # The model's own text is exactly its sampled segments, the output block left out.
    assert model_text(silent, tok) == "Let me compute.\n```python\nprint(r'\\boxed{7}')\n```\nDone.<|endoftext|>"
    assert "```output" in silent.text(tok) and "```output" not in model_text(silent, tok)
    assert grading_text(silent, tok, grade_tool_output=True) == silent.text(tok)
    assert answer_only_in_tool_output(model_text(silent, tok), silent.text(tok))
    assert not answer_only_in_tool_output(model_text(restated, tok), restated.text(tok))

    default = score_trajectories([silent, restated], ["7", "7"], tok, RewardConfig(), max_response_tokens=256)
    assert [r.correct for r in default] == [False, True]
    assert default[0].info["answer"] is None and default[0].reward == -1.0
    with_output = score_trajectories(
        [silent, restated], ["7", "7"], tok, RewardConfig(grade_tool_output=True), max_response_tokens=256
    )
    assert [r.correct for r in with_output] == [True, True]
    # A box written in the model's code is code, not a stated answer; one after it is.
    assert without_code_blocks("a ```python\nprint(r'\\boxed{1}')\n```\nb") == "a \n\nb"
    assert extract_boxed(without_code_blocks("```python\nx = r'\\boxed{1}'\n``` so \\boxed{2}")) == "2"


def test_labelled_set_every_row_graded_as_labelled():
    """tests/data/grading_labels.jsonl: responses and references labelled by hand, by category
    (units, variables, spacing, the degree sign, scientific notation, a line break after \\boxed,
    fenced blocks, several boxes, near-misses). Every row must grade as labelled, and every
    near-miss wrong; rows with ``distinct_boxes`` also check how many answers were boxed."""
    rows = [json.loads(line) for line in LABELS.read_text(encoding="utf-8").splitlines() if line.strip()]
    categories = {row["category"] for row in rows}
    for category in categories:  # each category has both kinds
        labels = {row["correct"] for row in rows if row["category"] == category}
        assert labels == {True, False}, category
    assert sum(not row["correct"] for row in rows) >= 40
    results = compute_rewards("math", [r["response"] for r in rows], [r["reference"] for r in rows])
    wrong = [
        (row["category"], row["response"], row["reference"], row["correct"], result.info.get("reason"))
        for row, result in zip(rows, results)
        if result.correct != row["correct"]
        or result.fault is not None
        or result.info["num_distinct_boxes"] != row.get("distinct_boxes", result.info["num_distinct_boxes"])
    ]
    assert not wrong, wrong


def test_equivalent_boxes_are_one_answer_for_the_several_boxes_penalty():
    cfg = RewardConfig(multi_box_penalty=0.5)
    rs = compute_rewards(
        "math",
        [
            r"$\boxed{\frac12}$, i.e. $\boxed{0.5}$",
            r"$\boxed{\frac12}$, no: $\boxed{0.25}$",
            r"\boxed{1} \boxed{2} \boxed{1.0}",
        ],
        ["0.5", "0.25", "1"],
        None,
        cfg,
    )
    assert [(r.reward, r.info["num_distinct_boxes"], r.info["penalties"]) for r in rs] == [
        (1.0, 1, {}),
        (0.5, 2, {"multi_box": 0.5}),
        (0.5, 2, {"multi_box": 0.5}),
    ]


def test_a_sandbox_fault_is_not_graded_for_any_reward():
    calls = []

    @register_reward("test_counting")
    def counting(response_text, reference, *, trajectory_info):
        calls.append(response_text)
        return RewardResult(reward=1.0, correct=True)

    infos = [{}, {"sandbox_fault": True}, {"sandbox_fault": False}]
    for name in ("math", "test_counting"):
        rs = compute_rewards(name, [r"\boxed{1}", r"\boxed{1}", r"\boxed{1}"], ["1", "1", "1"], infos)
        assert [(r.fault, r.correct, r.reward) for r in rs] == [
            (None, True, 1.0),
            ("sandbox", False, 0.0),
            (None, True, 1.0),
        ]
        assert rs[1].info["reason"] == "sandbox"
    assert calls == [r"\boxed{1}", r"\boxed{1}"]  # the faulted response never reached the reward
    assert [r.fault for r in compute_rewards("math", [r"\boxed{1}"], ["1"], [{"sandbox_fault": True}])] == ["sandbox"]


def test_score_trajectories_leaves_a_sandbox_fault_ungraded():
    tok = byte_tokenizer()

    def trajectory(status):
        code = "```python\nprint(7)\n```\n"
        traj = Trajectory(prompt_ids=tok.encode("Q", add_special_tokens=False))
        code_span = traj.append(tok.encode(code, add_special_tokens=False), None, trainable=True)
        fb_span = traj.append(tok.encode("```output\n7\n```\n", add_special_tokens=False), None, trainable=False)
        traj.append(tok.encode("so \\boxed{7}", add_special_tokens=False), None, trainable=True)
        traj.tool_calls.append(ToolCall("print(7)", status, "7", code_span, fb_span))
        traj.finish_reason = "eos"
        return traj

    ok, faulted = trajectory("ok"), trajectory(SANDBOX_FAULT)
    assert faulted.sandbox_fault and reward_info_from_trajectory(faulted)["sandbox_fault"]
    rs = score_trajectories([ok, faulted], ["7", "7"], tok, RewardConfig(), max_response_tokens=256)
    assert [(r.fault, r.correct, r.reward) for r in rs] == [(None, True, 1.0), ("sandbox", False, 0.0)]


def test_reward_config_validation():
    with pytest.raises(ValueError, match="no_box_penalty"):
        RewardConfig(no_box_penalty=-1)
    with pytest.raises(ValueError, match="grader_timeout_s"):
        RewardConfig(grader_timeout_s=0)
    with pytest.raises(ValueError, match="lengths differ"):
        compute_rewards("math", ["a", "b"], ["1"])


# ---------------------------------------------------------------------------------------------
# The registry


def test_user_reward_registration():
    @register_reward("test_last_word")
    def last_word(response_text, reference, *, trajectory_info):
        words = response_text.split()
        correct = bool(words) and words[-1] == reference
        return RewardResult(reward=2.0 if correct else -0.5, correct=correct, info={"n": len(words)})

    assert get_reward("test_last_word") is last_word
    rs = compute_rewards("test_last_word", ["the answer is blue", "red"], ["blue", "blue"], [{}, {}])
    assert [(r.reward, r.correct, r.info["n"]) for r in rs] == [(2.0, True, 4), (-0.5, False, 1)]

    # A reward that takes the config receives the run's RewardConfig.
    @register_reward("test_scaled")
    def scaled(response_text, reference, *, trajectory_info, config):
        ok = response_text == reference
        return RewardResult(config.correct_reward if ok else config.wrong_reward, ok)

    rs = compute_rewards(
        None, ["a", "b"], ["a", "a"], None, RewardConfig(name="test_scaled", correct_reward=3.0, wrong_reward=-2.0)
    )
    assert [r.reward for r in rs] == [3.0, -2.0]

    with pytest.raises(ValueError, match="already registered"):
        register_reward("test_last_word")(last_word)
    with pytest.raises(TypeError, match="trajectory_info"):
        register_reward("test_bad")(lambda response_text, reference: None)
    with pytest.raises(KeyError, match="unknown reward 'nope'.*math"):
        get_reward("nope")
