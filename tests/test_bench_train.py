"""`cir bench train`: both collectors measured side by side (a smoke run: a few warm-start steps,
one timed step of a tiny batch)."""

import json

import pytest

from cir.cli import main


def test_both_collectors_are_measured_side_by_side(tmp_path, warm_model_dir, capsys):
    out = tmp_path / "bench.json"
    args = ["bench", "train", "--workload", "long-tail", "--model", str(warm_model_dir), "--steps", "1"]
    # --set reaches both modes' trainers (and wins over the workload's own 320-token limit).
    short = ["--set", "rollout.max_response_tokens=24"]
    assert main([*args, "--prompts", "2", "--samples", "2", *short, "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| long-tail | sync |" in table and "| long-tail | async |" in table, table
    rows = json.loads(out.read_text())["rows"]
    assert [r["mode"] for r in rows] == ["sync", "async"]
    for r in rows:
        assert r["steps_per_min"] > 0 and r["trained_trajectories_per_step"] == 4, r
        assert 0 < r["trained_tokens_per_step"] <= 4 * 24, r
    assert rows[1]["staleness_max"] <= 1


@pytest.mark.parametrize(
    "bad, says",
    [
        (["--set", "optim.nope=1"], "--set: unknown config key(s) optim.nope"),
        (["--device", "gpu"], "argument --device: invalid choice: 'gpu'"),
        (["--layers", "0"], "--layers, --hidden-size and --warmup-steps must be >= 1"),
    ],
)
def test_bad_settings_end_the_command_before_any_work(capsys, bad, says):
    with pytest.raises(SystemExit) as stop:
        main(["bench", "train", "--workload", "long-tail", *bad])
    message = str(stop.value.code) if isinstance(stop.value.code, str) else capsys.readouterr().err
    assert stop.value.code != 0 and says in message, message
