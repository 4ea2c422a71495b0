"""Rewards: boxed-answer extraction, math-verify grading in worker processes, reward shaping."""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import cir.rewards
from cir.rewards import (
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
    grading_text,
    has_unclosed_code_block,
    model_text,
    overlong_penalty,
    register_reward,
    reward_info_from_trajectory,
    score_trajectories,
    without_code_blocks,
)
from cir.tokenization import byte_tokenizer
from cir.trajectory import ToolCall, Trajectory


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
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_extract_all_boxed_counts_nested_once_and_skips_unclosed():
    text = r"\boxed{1} \fbox{2} \boxed{\frac{3}{\boxed{4}}} \boxed 5 \boxed{6"
    assert extract_all_boxed(text) == ["1", "2", r"\frac{3}{\boxed{4}}", "5"]
    assert extract_all_boxed("nothing") == []


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


def test_hanging_grader_is_killed_replaced_and_counts_wrong():
    # 9^(9^9) is a ~370-million-digit integer: sympy computes it in C, which neither
    # math-verify's signal alarm nor anything but killing the process can interrupt.
    with GraderPool(num_workers=1) as pool:
        pool.start()
        assert pool.submit("1+1", "2", 60).result(timeout=120).correct  # worker up and grading
        pid_before = pool.worker_pids
        start = time.monotonic()
        outcome = pool.submit("9^{9^{9}}", "3", 0.5).result(timeout=60)
        elapsed = time.monotonic() - start
        assert not outcome.correct
        assert outcome.reason == "grader_timeout"
        assert elapsed < 5.0, f"timed-out request took {elapsed:.1f} s"
        assert pool.restarts == 1
        assert pool.worker_pids != pid_before
        # The replacement worker grades normally.
        assert pool.submit(r"\frac{2}{4}", "0.5", 30).result(timeout=120).correct


def test_hanging_grader_in_batch_does_not_spoil_the_others():
    with GraderPool(num_workers=2) as pool:
        outs = grade_outcomes([("9^{9^{9}}", "3"), ("0.25", r"\frac14"), ("2", "3")], timeout_s=1.0, pool=pool)
    assert [(o.correct, o.reason) for o in outs] == [
        (False, "grader_timeout"),
        (True, "equivalent"),
        (False, "not_equivalent"),
    ]


def test_math_reward_grader_timeout_counts_wrong():
    rs = compute_rewards(
        "math", [r"\boxed{9^{9^{9}}}", r"\boxed{3}"], ["3", "3"], None, RewardConfig(grader_timeout_s=0.5)
    )
    assert [(r.reward, r.correct, r.info["reason"]) for r in rs] == [
        (-1.0, False, "grader_timeout"),
        (1.0, True, "exact_match"),
    ]
    assert grade(r"\frac{6}{2}", "3")  # the shared pool replaced the killed worker and grades on


def test_grader_memory_limit_is_applied_to_workers():
    limits_file = "/proc/{pid}/limits"
    with GraderPool(num_workers=1, memory_limit_mb=1536) as pool:
        assert pool.submit("2", "2.0", 30).result(timeout=120).correct
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
