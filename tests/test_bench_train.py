"""`cir bench train`: both collectors measured side by side (a smoke run: a few warm-start steps,
one timed step of a tiny batch)."""

import json

from cir.cli import main


def test_both_collectors_are_measured_side_by_side(tmp_path, warm_model_dir, capsys):
    out = tmp_path / "bench.json"
    args = ["bench", "train", "--workload", "long-tail", "--model", str(warm_model_dir), "--steps", "1"]
    assert main([*args, "--prompts", "2", "--samples", "2", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| long-tail | sync |" in table and "| long-tail | async |" in table, table
    rows = json.loads(out.read_text())["rows"]
    assert [r["mode"] for r in rows] == ["sync", "async"]
    for r in rows:
        assert r["steps_per_min"] > 0 and r["trained_trajectories_per_step"] == 4, r
    assert rows[1]["staleness_max"] <= 1
