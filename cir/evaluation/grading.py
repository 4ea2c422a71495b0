"""Answer groups for majority voting: which of a problem's extracted answers are the same answer.

Two answers are one group when their normal forms are equal (`normalize_answer`), when both
were graded correct (each equals the reference, so they equal each other), or when math-verify
finds them equivalent (asked through the grader pool, in one batch for all problems, only for
pairs of wrong answers with different normal forms).
"""

from __future__ import annotations

from collections.abc import Sequence

from cir.rewards import grade_outcomes, normalize_answer


def answer_groups(
    problems: Sequence[tuple[Sequence[str | None], Sequence[bool]]], timeout_s: float = 5.0
) -> list[list[int | None]]:
    """For each problem's (answers, correct) in sample order: each sample's group label
    (0, 1, ... in order of first appearance; None for a sample without an answer)."""
    keys_per_problem: list[list[str | None]] = []
    pairs: list[tuple[str, str]] = []
    pair_index: list[tuple[int, str, str]] = []
    for p, (answers, correct) in enumerate(problems):
        keys: list[str | None] = []
        for answer, ok in zip(answers, correct):
            if answer is None or not answer.strip():
                keys.append(None)
            else:
                # Every correct answer equals the reference, hence each other: one key for them.
                keys.append("\x00correct" if ok else normalize_answer(answer))
        keys_per_problem.append(keys)
        wrong = list(dict.fromkeys(k for k in keys if k is not None and k != "\x00correct"))
        representative = {normalize_answer(a): a for a, k in zip(answers, keys) if k in wrong}
        for i, a in enumerate(wrong):
            for b in wrong[i + 1 :]:
                pairs.append((representative[b], representative[a]))
                pair_index.append((p, a, b))
    verdicts = grade_outcomes(pairs, timeout_s) if pairs else []
    merged: list[dict[str, str]] = [{} for _ in problems]
    for (p, a, b), verdict in zip(pair_index, verdicts):
        if verdict.correct:
            parent = merged[p]
            root_a, root_b = _root(parent, a), _root(parent, b)
            if root_a != root_b:
                parent[root_b] = root_a
    out = []
    for p, keys in enumerate(keys_per_problem):
        labels: dict[str, int] = {}
        row: list[int | None] = []
        for key in keys:
            if key is None:
                row.append(None)
                continue
            root = _root(merged[p], key)
            row.append(labels.setdefault(root, len(labels)))
        out.append(row)
    return out


def _root(parent: dict[str, str], key: str) -> str:
    while key in parent:
        key = parent[key]
    return key
