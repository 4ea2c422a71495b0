"""The dataset and prompt layer: loading problems (real benchmark files and malformed ones),
the resumable problem sampler, and prompt templates."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from cir.data import (
    BENCHMARKS,
    MIN_RESPONSE_TOKENS,
    DatasetError,
    Problem,
    ProblemSampler,
    answer_from_solution,
    drop_or_refuse_overlong,
    find_overlong,
    load_problems,
    overlong_message,
    problems_to_rows,
    reference_answer,
)
from cir.prompts import PromptTemplate, get_prompt, prompt_token_ids, register_prompt, render
from cir.rewards import extract_boxed, normalize_answer

BENCHMARK_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "benchmarks"
EXPECTED_ROWS = {
    "aime24": 30,
    "aime25": 30,
    "amc23": 40,
    "math500": 500,
    "olymmath-en-easy": 100,
    "olymmath-en-hard": 100,
}

needs_benchmarks = pytest.mark.skipif(not BENCHMARK_DIR.is_dir(), reason=f"benchmark files not at {BENCHMARK_DIR}")


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# Real benchmark files


@needs_benchmarks
@pytest.mark.parametrize("name", sorted(EXPECTED_ROWS))
def test_benchmarks_load_with_expected_counts(name):
    assert set(BENCHMARKS) == set(EXPECTED_ROWS)
    problems = load_problems(name, benchmark_dir=BENCHMARK_DIR)
    assert len(problems) == EXPECTED_ROWS[name]
    assert len({p.id for p in problems}) == len(problems)
    for p in problems:
        assert p.problem.strip() and p.answer.strip()
        assert "\\boxed" not in p.answer
        assert p.source == name


@needs_benchmarks
def test_benchmark_answers_spot_checks():
    aime24 = load_problems("aime24", benchmark_dir=BENCHMARK_DIR)
    assert all(re.fullmatch(r"\d+", p.answer) for p in aime24), [p.answer for p in aime24]
    assert aime24[0].answer == "204" and aime24[0].id == "aime24-0"
    assert load_problems("aime25", benchmark_dir=BENCHMARK_DIR)[0].answer == "70"
    amc = load_problems("amc23", benchmark_dir=BENCHMARK_DIR)
    assert (amc[0].id, amc[0].answer) == ("0", "27")
    assert amc[0].meta["url"].startswith("https://")
    math500 = load_problems("math500", benchmark_dir=BENCHMARK_DIR)
    assert math500[0].answer == r"\left( 3, \frac{\pi}{2} \right)"
    assert math500[0].id == "test/precalculus/807.json"
    assert math500[0].meta["subject"] == "Precalculus" and "solution" in math500[0].meta
    easy = load_problems("olymmath-en-easy", benchmark_dir=BENCHMARK_DIR)
    assert easy[1].answer == r"4\sqrt{15}-14"
    hard = load_problems("olymmath-en-hard", benchmark_dir=BENCHMARK_DIR)
    assert hard[4].answer == r"241 + 44\sqrt{30}"


@needs_benchmarks
def test_math500_worked_solutions_end_in_their_answer():
    """The last box of each of the 500 worked solutions holds the row's `answer` field: a test
    of box extraction (nested braces, several boxes) on real solutions."""
    for p in load_problems("math500", benchmark_dir=BENCHMARK_DIR):
        boxed = extract_boxed(p.meta["solution"])
        assert boxed is not None, p.id
        assert normalize_answer(boxed) == normalize_answer(p.answer), (p.id, boxed, p.answer)


@needs_benchmarks
def test_benchmark_lookup_by_path_env_and_limit(monkeypatch, tmp_path):
    by_path = load_problems(BENCHMARK_DIR / "amc23.jsonl", limit=5)
    assert [p.answer for p in by_path] == [p.answer for p in load_problems("amc23", benchmark_dir=BENCHMARK_DIR)[:5]]
    monkeypatch.setenv("CIR_BENCHMARK_DIR", str(BENCHMARK_DIR))
    assert len(load_problems("aime25")) == 30
    monkeypatch.setenv("CIR_BENCHMARK_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="aime25.jsonl not found"):
        load_problems("aime25")


# ---------------------------------------------------------------------------------------------
# Reference answers and field detection


def test_answer_from_solution_forms():
    assert answer_from_solution(r"\boxed{204}") == "204"
    assert answer_from_solution("27") == "27"
    assert answer_from_solution(r"$\frac{1}{2}$") == r"\frac{1}{2}"
    worked = "First $x = 2$.\n\nThen $\\boxed{x}$ is wrong, so the answer is $\\boxed{\\frac{x^{2}}{2}}$."
    assert answer_from_solution(worked) == r"\frac{x^{2}}{2}"
    with pytest.raises(ValueError, match="no \\\\boxed"):
        answer_from_solution("We compute the sum.\nIt is 5.")
    with pytest.raises(ValueError, match="not closed"):
        answer_from_solution(r"so \boxed{\frac{1}{2}")


def test_reference_answer_field_priority():
    assert reference_answer({"answer": "3", "solution": r"\boxed{4}"}) == "3"
    assert reference_answer({"final_answer": 7}) == "7"
    assert reference_answer({"answer": "", "solution": r"long text \boxed{9}"}) == "9"
    assert reference_answer({"answer": r"\boxed{5}"}) == "5"
    assert reference_answer({"target": "11", "answer": "1"}, answer_field="target") == "11"


def test_field_detection_and_overrides(tmp_path):
    f = write(
        tmp_path / "mixed.jsonl",
        json.dumps({"question": "1+1?", "final_answer": "2"})
        + "\n\n"  # blank lines are skipped
        + json.dumps({"prompt": "2+2?", "solution": r"Add them: $\boxed{4}$"})
        + "\n"
        + json.dumps({"problem": "3+3?", "answer": 6, "level": 1, "unique_id": "u3"})
        + "\n",
    )
    ps = load_problems(f)
    assert [(p.id, p.problem, p.answer) for p in ps] == [
        ("mixed-0", "1+1?", "2"),
        ("mixed-1", "2+2?", "4"),
        ("u3", "3+3?", "6"),
    ]
    assert ps[2].meta == {"answer": 6, "level": 1}
    g = write(tmp_path / "custom.jsonl", json.dumps({"text": "q", "label": "42", "problem": "ignored"}) + "\n")
    (p,) = load_problems(g, problem_field="text", answer_field="label")
    assert (p.problem, p.answer) == ("q", "42")
    rows = problems_to_rows(ps)
    assert rows[2]["answer"] == "6" and rows[2]["level"] == 1 and rows[2]["id"] == "u3"


def test_json_parquet_and_directories(tmp_path):
    write(tmp_path / "a.json", json.dumps([{"problem": "p0", "answer": "0"}, {"problem": "p1", "answer": "1"}]))
    assert [p.answer for p in load_problems(tmp_path / "a.json")] == ["0", "1"]
    write(tmp_path / "b.json", json.dumps({"data": [{"problem": "p", "answer": "5"}]}))
    assert load_problems(tmp_path / "b.json")[0].answer == "5"
    write(
        tmp_path / "c.json",
        json.dumps({"problem": "x", "answer": "1"}) + "\n" + json.dumps({"problem": "y", "answer": "2"}) + "\n",
    )
    assert [p.problem for p in load_problems(tmp_path / "c.json")] == ["x", "y"]  # JSON lines named .json

    d = tmp_path / "ds"
    d.mkdir()
    write(d / "train.jsonl", json.dumps({"problem": "t", "answer": "1"}) + "\n")
    write(
        d / "test.jsonl",
        json.dumps({"problem": "e", "answer": "2"}) + "\n" + json.dumps({"problem": "f", "answer": "3"}) + "\n",
    )
    assert [p.problem for p in load_problems(d)] == ["t"]
    assert [(p.id, p.problem) for p in load_problems(d, split="test")] == [("ds-0", "e"), ("ds-1", "f")]
    assert [p.problem for p in load_problems(d, split="validation")] == ["e", "f", "t"]  # no such split: all files

    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError:
        with pytest.raises(ImportError, match="pyarrow"):
            load_problems(write(tmp_path / "x.parquet", "not really parquet"))
    else:
        pq.write_table(pyarrow.table({"problem": ["p"], "answer": ["8"]}), tmp_path / "y.parquet")
        assert load_problems(tmp_path / "y.parquet")[0].answer == "8"


def test_unknown_specs_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="no dataset file"):
        load_problems(tmp_path / "missing.jsonl")
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install datasets"):
            load_problems("someone/some-dataset")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="no .jsonl"):
        load_problems(empty)
    with pytest.raises(DatasetError, match="no problems found"):
        load_problems(write(tmp_path / "blank.jsonl", "\n\n"))


# ---------------------------------------------------------------------------------------------
# Malformed rows: the message names the file and the line


def test_bad_json_names_file_and_line(tmp_path):
    good = json.dumps({"problem": "p", "answer": "1"})
    f = write(tmp_path / "bad.jsonl", f'{good}\n{good}\n{{"problem": "p", "answer": \n{good}\n')
    with pytest.raises(DatasetError) as err:
        load_problems(f)
    assert f"{f}:3: invalid JSON" in str(err.value)


def test_missing_problem_field_names_line_and_fields_present(tmp_path):
    f = write(
        tmp_path / "nofield.jsonl",
        json.dumps({"problem": "p", "answer": "1"}) + "\n" + json.dumps({"text": "p", "answer": "2"}) + "\n",
    )
    with pytest.raises(DatasetError) as err:
        load_problems(f)
    msg = str(err.value)
    assert msg.startswith(f"{f}:2: no problem field")
    assert "'problem'" in msg and "'question'" in msg and "fields present: ['answer', 'text']" in msg
    with pytest.raises(DatasetError, match=re.escape(f"{f}:1: no problem field 'statement'")):
        load_problems(f, problem_field="statement")


def test_empty_or_missing_answer_names_line(tmp_path):
    f = write(
        tmp_path / "noanswer.jsonl",
        "\n".join(
            json.dumps(r)
            for r in [
                {"problem": "a", "answer": "1"},
                {"problem": "b", "answer": "2"},
                {"problem": "c", "answer": "  "},
            ]
        )
        + "\n",
    )
    with pytest.raises(DatasetError, match=re.escape(f"{f}:3: empty answer (field 'answer')")):
        load_problems(f)
    g = write(tmp_path / "noanswerfield.jsonl", json.dumps({"problem": "a", "notes": "x"}) + "\n")
    with pytest.raises(
        DatasetError, match=re.escape(f"{g}:1: no answer field") + ".*fields present: \\['notes', 'problem'\\]"
    ):
        load_problems(g)
    h = write(tmp_path / "worked.jsonl", json.dumps({"problem": "a", "solution": "Add.\nThe sum is 4."}) + "\n")
    with pytest.raises(DatasetError, match=re.escape(f"{h}:1: the solution looks like a worked solution")):
        load_problems(h)
    k = write(tmp_path / "emptyproblem.jsonl", json.dumps({"problem": "", "answer": "1"}) + "\n")
    with pytest.raises(DatasetError, match=re.escape(f"{k}:1: the problem field 'problem' is empty")):
        load_problems(k)
    m = write(tmp_path / "notobject.jsonl", json.dumps({"problem": "a", "answer": "1"}) + "\n[1, 2]\n")
    with pytest.raises(DatasetError, match=re.escape(f"{m}:2: expected a JSON object, found list")):
        load_problems(m)
    n = write(tmp_path / "rows.json", json.dumps([{"problem": "a", "answer": "1"}, {"problem": "b"}]))
    with pytest.raises(DatasetError, match=re.escape(f"{n} row 1: no answer field")):
        load_problems(n)


# ---------------------------------------------------------------------------------------------
# Prompts too long for the model


def test_overlong_prompts_are_found_with_their_rows_and_dropped_or_refused(tmp_path):
    rows = [{"problem": "x" * n, "answer": "1"} for n in (5, 9, 10, 3, 30, 12)]
    f = write(tmp_path / "train.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    problems = load_problems(f)
    assert [p.where for p in problems[:2]] == [f"{f}:1", f"{f}:2"]
    length = lambda p: len(p.problem)  # noqa: E731
    # The rule: prompt + one response token must fit the context (9 fits 10, 10 does not).
    assert MIN_RESPONSE_TOKENS == 1
    found = find_overlong(problems, length, max_model_len=10)
    assert [(o.problem.where, o.tokens) for o in found] == [(f"{f}:3", 10), (f"{f}:5", 30), (f"{f}:6", 12)]
    assert find_overlong(problems, length, max_model_len=None) == []
    assert overlong_message(found, 6, 10, show=2) == (
        f"3 of 6 prompts leave no room for a response in the model's context of 10 tokens: "
        f"{f}:3 (id train-2, 10 tokens); {f}:5 (id train-4, 30 tokens) and 1 more"
    )
    with pytest.raises(DatasetError, match=re.escape("data.train: 3 of 6 prompts leave no room")) as refused:
        drop_or_refuse_overlong("data.train", problems, length, 10, drop=False, say=print)
    assert "data.drop_overlong=true" in str(refused.value)
    said: list[str] = []
    kept = drop_or_refuse_overlong("data.train", problems, length, 10, drop=True, say=said.append)
    assert [p.where for p in kept] == [f"{f}:1", f"{f}:2", f"{f}:4"]
    assert len(said) == 1 and said[0].startswith("data.train: 3 of 6 prompts") and "left out" in said[0]
    assert drop_or_refuse_overlong("data.train", problems, length, 100, drop=False, say=print) is problems
    with pytest.raises(DatasetError, match="none left"):
        drop_or_refuse_overlong("data.train", problems, length, 2, drop=True, say=print)


# ---------------------------------------------------------------------------------------------
# The sampler


def make_problems(n: int) -> list[Problem]:
    return [Problem(id=f"p{i}", problem=f"q{i}", answer=str(i), source="t") for i in range(n)]


def ids(batch: list[Problem]) -> list[str]:
    return [p.id for p in batch]


def test_sampler_epochs_are_seeded_permutations():
    problems = make_problems(12)
    a = ProblemSampler(problems, batch_size=4, seed=7)
    b = ProblemSampler(problems, batch_size=4, seed=7)
    c = ProblemSampler(problems, batch_size=4, seed=8)
    run_a = [ids(a.next_batch()) for _ in range(6)]  # two epochs
    run_b = [ids(b.next_batch()) for _ in range(6)]
    run_c = [ids(c.next_batch()) for _ in range(6)]
    assert run_a == run_b
    assert run_a != run_c
    epoch0 = sum(run_a[:3], [])
    epoch1 = sum(run_a[3:], [])
    assert sorted(epoch0) == sorted(epoch1) == sorted(ids(problems))
    assert epoch0 != epoch1  # reshuffled
    assert epoch0 != ids(problems)
    assert (a.epoch, a.position) == (2, 0)
    ordered = ProblemSampler(problems, batch_size=5, seed=7, shuffle=False)
    assert ids(ordered.next_batch()) + ids(ordered.next_batch()) == ids(problems)[:10]
    assert ids(ordered.next_batch()) == ["p10", "p11", "p0", "p1", "p2"]  # wraps into epoch 1


def test_sampler_resume_continues_exactly():
    problems = make_problems(10)
    straight = ProblemSampler(problems, batch_size=3, seed=123)
    expected = [ids(straight.next_batch()) for _ in range(9)]

    first = ProblemSampler(problems, batch_size=3, seed=123)
    got = [ids(first.next_batch()) for _ in range(4)]
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint would store it
    resumed = ProblemSampler(problems, batch_size=3, seed=123)
    resumed.load_state_dict(state)
    got += [ids(resumed.next_batch()) for _ in range(5)]
    assert got == expected

    with pytest.raises(ValueError, match="num_problems"):
        ProblemSampler(make_problems(11), batch_size=3, seed=123).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        ProblemSampler(problems, batch_size=3, seed=124).load_state_dict(state)
    renamed = [Problem(id=f"x{i}", problem="q", answer="1", source="t") for i in range(10)]
    with pytest.raises(ValueError, match="fingerprint"):
        ProblemSampler(renamed, batch_size=3, seed=123).load_state_dict(state)


def test_sampler_take_and_peek_share_the_stream():
    problems = make_problems(7)
    reference = ProblemSampler(problems, batch_size=3, seed=5)
    stream = ids(reference.take(20))  # crosses two epoch boundaries
    assert len(stream) == 20
    assert sorted(stream[:7]) == sorted(stream[7:14]) == sorted(ids(problems))

    s = ProblemSampler(problems, batch_size=3, seed=5)
    assert ids(s.peek(9)) == stream[:9]
    assert (s.epoch, s.position) == (0, 0)  # peek does not draw
    got = ids(s.next_batch())  # 3
    got += ids(s.take(2))  # refill after dropping two groups
    got += ids(s.next_batch())  # 3 more: crosses into epoch 1
    got += ids(s.take(0))
    got += ids(s.take(12))
    assert got == stream
    with pytest.raises(ValueError):
        s.take(-1)
    with pytest.raises(ValueError, match="at least one problem"):
        ProblemSampler([], batch_size=1, seed=0)


# ---------------------------------------------------------------------------------------------
# Prompts

CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def small_tokenizer(chat_template: str | None = None, bos: bool = False) -> PreTrainedTokenizerFast:
    """A real fast tokenizer over a tiny word vocabulary (unknown words map to <unk>)."""
    words = ["<unk>", "<s>", "<|im_start|>", "<|im_end|>", "Problem:", "Solution:", "What", "is", "1+1?"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    if chat_template:
        tok.chat_template = chat_template
    return tok


def test_cir_prompt_plain_text():
    problem = r"Find $x$ with $\frac{x}{2} = {3}$."
    text = render("cir", problem)
    assert text.endswith(f"Problem: {problem}\n\nSolution:\n")
    for phrase in ("step by step", "```python", "```output", "executed", "\\boxed{}"):
        assert phrase in text, phrase
    plain = render("plain", problem)
    assert problem in plain and "\\boxed{}" in plain and "```python" not in plain
    assert render(get_prompt("cir"), problem) == text


def test_cir_chat_prompt_uses_the_chat_template():
    tok = small_tokenizer(CHATML)
    text = render("cir-chat", "What is 1+1?", tok)
    system = get_prompt("cir-chat").system
    assert text == (
        f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\nWhat is 1+1?<|im_end|>\n<|im_start|>assistant\n"
    )
    # Without a chat template the same instruction is rendered as plain text.
    no_chat = small_tokenizer(None)
    assert render("cir-chat", "What is 1+1?", no_chat) == f"{system}\n\nWhat is 1+1?"
    with pytest.raises(ValueError, match="pass the tokenizer"):
        render("cir-chat", "What is 1+1?")


def test_chat_template_without_system_role_gets_merged_instruction():
    strict = (
        "{%- for message in messages %}"
        "{%- if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}{%- endif %}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{%- endfor %}{{- '<|im_start|>assistant\\n' }}"
    )
    text = render("cir-chat", "What is 1+1?", small_tokenizer(strict))
    system = get_prompt("cir-chat").system
    assert text == f"<|im_start|>user\n{system}\n\nWhat is 1+1?<|im_end|>\n<|im_start|>assistant\n"


def test_prompt_token_ids_add_special_tokens_once():
    tok = small_tokenizer(CHATML, bos=True)
    chat_ids = prompt_token_ids("cir-chat", "What is 1+1?", tok)
    assert chat_ids[0] == tok.convert_tokens_to_ids("<|im_start|>")  # no BOS added to a chat rendering
    assert chat_ids == tok(render("cir-chat", "What is 1+1?", tok), add_special_tokens=False)["input_ids"]
    plain_ids = prompt_token_ids("cir", "What is 1+1?", tok)
    assert plain_ids[0] == 1  # the plain text gets the tokenizer's BOS
    assert plain_ids.count(1) == 1
    assert plain_ids[1:] == tok(render("cir", "What is 1+1?"), add_special_tokens=False)["input_ids"]
    assert plain_ids[-4:] == tok.convert_tokens_to_ids(["What", "is", "1+1?", "Solution:"])


def test_prompt_registry():
    template = register_prompt(PromptTemplate("test-qa", system="", user_format="Q: {problem}\nA:"))
    assert get_prompt("test-qa") is template
    assert render("test-qa", "2+2 {x}") == "Q: 2+2 {x}\nA:"
    with pytest.raises(ValueError, match="already registered"):
        register_prompt(template)
    with pytest.raises(ValueError, match="exactly once"):
        PromptTemplate("bad", system="", user_format="no placeholder")
    with pytest.raises(KeyError, match="unknown prompt template 'nope'.*'cir'"):
        get_prompt("nope")
