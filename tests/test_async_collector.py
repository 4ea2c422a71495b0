"""The asynchronous collector (`run.collector=async`) on the demo task: real engine (transformers),
real sandbox, real rewards; the suite's warm-started demo model."""

import asyncio

import pytest
import torch
from conftest import SMALL_DEMO_RUN

from cir.metrics import read_metrics
from cir.training.async_collector import CollectorTimeout
from cir.training.config import load_train_config
from cir.training.trainer import Trainer

FAST = [*SMALL_DEMO_RUN, "run.eval_at_start=false", "data.eval=[]", "data.prompt=demo"]


def _cfg(out, warm, *extra):
    return load_train_config(None, [*FAST, f"model.path={warm}", f"run.out_dir={out}", *extra])


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_staleness_zero_trains_what_the_synchronous_trainer_trains(tmp_path, warm_model_dir):
    """S=0: the same samples (same seeds, same weights at each step), so the same weights to float
    tolerance (the async loss takes the ratio against the sampler's log-probs, the synchronous one
    against the trainer's: equal up to the engine/trainer rounding gap). Decoupled PPO too: its
    proximal policy is the sampler's, so every truncated sampler ratio is 1."""
    runs = {}
    async_s0 = ["run.collector=async", "run.max_staleness=0"]
    for name, extra in (
        ("sync", []),
        ("async", async_s0),
        ("decoupled", [*async_s0, "algo.off_policy_loss=decoupled"]),
    ):
        with Trainer(_cfg(tmp_path / name, warm_model_dir, "run.steps=3", *extra)) as t:
            w0 = _weights(t.actor.model)
            t.fit()
            runs[name] = _weights(t.actor.model)
    assert any(not torch.equal(w0[k], runs["sync"][k]) for k in w0), "training did not change the weights"
    sync_rows = read_metrics(tmp_path / "sync" / "metrics.jsonl")
    # The synchronous collector says how busy the engine was while it collected.
    assert all(0 < r["engine/rollout_busy_share"] <= 1 for r in sync_rows), sync_rows
    for name in ("async", "decoupled"):
        for k in w0:
            torch.testing.assert_close(runs[name][k], runs["sync"][k], atol=2e-5, rtol=1e-4, msg=f"{name}: {k}")
        async_rows = read_metrics(tmp_path / name / "metrics.jsonl")
        assert len(async_rows) == len(sync_rows) == 3
        for a, b in zip(sync_rows, async_rows):
            # The same trajectories: the same rewards and tool calls at every step.
            assert a["reward/mean"] == b["reward/mean"] and a["tool/calls_per_traj"] == b["tool/calls_per_traj"]
            assert b["async/staleness_max"] == 0 and b["async/groups_carried"] == 0
            if name == "decoupled":  # the truncated sampler ratio weighs the loss, and is 1 here
                assert b["actor/rollout_correction_weight"] == pytest.approx(1.0, abs=1e-3), b
            else:
                assert "actor/rollout_correction_weight" not in b


def test_staleness_bound_holds_and_survives_resume(tmp_path, warm_model_dir):
    """S=1: tokens up to one version old are trained (the second step trains groups admitted
    under the first weights), never older; a run resumed from a mid-run checkpoint regenerates
    the groups in flight and keeps the bound."""
    out = tmp_path / "run"
    with Trainer(_cfg(out, warm_model_dir, "run.steps=2", "run.save_every=1", "run.collector=async")) as t:
        t.fit()
        state = t.collector.state_dict()
    # Groups admitted but untrained when the run stopped: (S + 1) * B admitted, B trained per step.
    assert len(state["async"]["pending"]) == 4, state["async"]
    with Trainer(_cfg(out, warm_model_dir, "run.steps=4", "run.collector=async"), resume=True) as t:
        assert t.step_count == 2
        t.fit()
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "async/staleness_max" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert 0 <= r["async/staleness_max"] <= 1, r
        assert r["async/over_bound_groups"] == 0, r
        assert r["async/groups_carried"] == 4, r  # capacity (S + 1) * B admitted, minus B trained
    # Step 2 trains the first step's leftovers: tokens sampled under version 0, one version old.
    assert rows[1]["async/staleness_max"] == 1 and rows[1]["async/stale_token_share"] > 0
    # The resumed step 3 trains regenerated groups: all under the resumed weights.
    assert rows[2]["async/staleness_max"] == 0
    # Mismatch against the sampler, and the clip fraction of the ratio taken against it.
    for key in ("async/engine_idle_share", "async/tokens_per_s", "actor/sampler_kl", "actor/clipfrac_upper"):
        assert key in rows[-1], key


class _StuckEngine:
    """The run's engine, except that generate never returns (a hung engine)."""

    def __init__(self, engine):
        self._engine = engine

    def __getattr__(self, name):
        return getattr(self._engine, name)

    async def generate(self, prompt_ids, params):
        await asyncio.sleep(3600)


def test_a_stuck_engine_ends_the_step_with_a_clear_error(tmp_path, warm_model_dir):
    cfg = _cfg(tmp_path, warm_model_dir, "run.steps=1", "run.collector=async", "run.async_timeout_s=2")
    with Trainer(cfg) as t:
        t.collector.engine = _StuckEngine(t.engine)
        with pytest.raises(CollectorTimeout, match="run.async_timeout_s"):
            t.step()


def test_sandbox_time_overlapped_with_an_update_is_the_union_of_its_snippets():
    """Two snippets sleeping 0.6 s side by side, an update window from 0.2 s to 0.4 s: the sandbox
    was busy for the whole window (0.2 s), not twice that."""
    from cir.sandbox import Sandbox
    from cir.training.async_collector import _TimedSandbox

    async def scenario(timed):
        runs = [asyncio.ensure_future(timed.arun("import time; time.sleep(0.6)", timeout_s=5)) for _ in range(2)]
        await asyncio.sleep(0.2)
        timed.window_opens()
        await asyncio.sleep(0.2)
        timed.window_closes()
        return await asyncio.gather(*runs)

    with Sandbox(workers=2, timeout_s=5) as sandbox:
        timed = _TimedSandbox(sandbox)
        results = asyncio.run(scenario(timed))
    assert [r.status for r in results] == ["ok", "ok"]
    assert timed.overlap_s == pytest.approx(0.2, abs=0.05)
