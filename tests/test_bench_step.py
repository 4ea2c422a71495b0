"""`cir bench step`: one RL update of a model built from a config, measured beside the estimator's
prediction and the matmul floor. Tiny shapes on the CPU; the 0.5B on a GPU is the device check's."""

from __future__ import annotations

import json

import pytest

from cir.bench import step as bench
from cir.bench.estimate import ModelShape
from cir.cli import main

TINY = ["--model", "tiny", "--prompts", "2", "--samples", "2", "--response-tokens", "12", "--prompt-tokens", "6"]
TINY += ["--threads", "1", "--clock", "cpu", "--warmup", "1", "--steps", "1"]


def test_named_sizes_are_the_shapes_they_claim():
    forty = ModelShape.from_hf_config(bench.model_config("40m").to_dict())
    assert forty.params == 39_815_936 and forty.vocab_size == 151_936 and forty.tie_word_embeddings
    half = ModelShape.from_hf_config(bench.model_config("0.5b").to_dict())
    assert half.params == 494_032_768  # Qwen2.5-0.5B's published count


def test_update_is_measured_beside_its_floor_and_the_estimate(tmp_path, capsys):
    out = tmp_path / "step.json"
    assert main(["bench", "step", *TINY, "--mini-batches", "2", "--kl", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "update / floor:" in text and "matmul floor:" in text
    r = json.loads(out.read_text())
    m, f, p = r["measured"], r["floor"], r["predicted"]
    assert r["model"]["vocab_size"] == 151_936 and r["batch"]["trained_tokens"] == 4 * (6 + 12)
    # The update does every matmul of the floor and more (the log-prob path recomputes the logits).
    assert m["update_s_best"] > f["seconds"] > 0 and f["update_over_floor"] > 1
    assert f["lm_head_flops"] == 3 * 2 * 64 * 151_936 * 4 * 12
    assert all(g["tflops"] > 0 for g in f["matmul"]["gemms"])
    # Off-policy (two mini-batches) with a KL reference: the no-grad passes ran and were timed.
    shares = m["phase_shares"]
    assert shares["old/ref log-probs"] > 0 and shares["forward"] > 0 and shares["backward"] > 0
    assert sum(shares.values()) == pytest.approx(1.0)
    assert p["phase_shares"]["old/ref log-probs"] == pytest.approx(2 / 5)  # old + ref of 5 passes
    assert p["update_s"] > 0 and p["peak_bytes"] > 0
    assert m["peak_bytes"] is None or m["peak_bytes"] >= 0  # None where /proc cannot reset the peak
    assert m["tokens_per_s"] == pytest.approx(r["batch"]["trained_tokens"] / m["update_s_best"])


def test_on_policy_update_has_no_extra_pass_and_a_config_file_works(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**bench.MODEL_SIZES["tiny"], "vocab_size": 3000, "model_type": "qwen2"}))
    out = tmp_path / "step.json"
    args = [a if a != "tiny" else str(config) for a in TINY]
    assert main(["bench", "step", *args, "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["model"]["vocab_size"] == 3000
    assert r["measured"]["phase_shares"]["old/ref log-probs"] == 0
    assert r["predicted"]["phase_shares"]["old/ref log-probs"] == 0


def test_bad_model_is_one_line_naming_it(capsys):
    assert main(["bench", "step", "--model", "no/such/thing.json"]) == 2
    assert "no/such/thing.json" in capsys.readouterr().err
