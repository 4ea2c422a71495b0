"""The sharded actor's weights reach each rank's engine exactly, and a rank with nothing to train
on still takes part in the update (placeholder passes, KL term included), on two real gloo ranks
under torchrun."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import assert_metrics_match

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")

_WORKER = r"""
import json, sys
import torch
from cir.algorithms import AlgoConfig
from cir.distributed import init_distributed
from cir.engines.factory import make_engine
from cir.tasks import demo
from cir.training.actor import Actor, sync_weights
from cir.training.batch import build_train_batch
from cir.training.optim import OptimConfig
from cir.trajectory import Trajectory

torch.set_num_threads(1)
out = sys.argv[1]
dist = init_distributed(timeout_s=120)
tok = demo.demo_tokenizer()
vocab = len(tok)


def fresh_model():
    return demo.demo_model(tok, hidden_size=32, num_layers=2, num_heads=4, seed=0).eval()


def trajectories(n, seed):
    g = torch.Generator().manual_seed(seed)
    trajs = []
    for i in range(n):
        p, r = int(torch.randint(2, 9, (1,), generator=g)), int(torch.randint(1, 20, (1,), generator=g))
        t = Trajectory(prompt_ids=torch.randint(3, vocab, (p,), generator=g).tolist(), problem_id=str(i), group=i)
        t.append(torch.randint(3, vocab, (r,), generator=g).tolist(), None, trainable=True)
        trajs.append(t)
    return trajs


def batch_of(trajs, advantages, positions):
    # Two optimizer steps: a trajectory's mini-batch follows its global position, as in one process.
    return build_train_batch(trajs, advantages, pad_id=tok.pad_token_id, device="cpu", mini_batches=2,
                             micro_batch_tokens=64, temperature=1.0, max_response_tokens=32, positions=positions)


# A KL term: a rank with no micro-batch must still bring reference log-probs to its placeholder passes.
optim, algo = OptimConfig(lr=1e-2), AlgoConfig(aggregation="token-mean", kl_coef=0.05)
model = fresh_model()
initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
engine = make_engine("hf", model, tok, max_batch_size=4, seed=0)  # its own copy, before sharding
actor = Actor(model, tok, optim, algo, total_optimizer_steps=2, dist=dist)
assert actor.sharded
reference = Actor(fresh_model(), tok, optim, algo, total_optimizer_steps=2)  # the whole batch, one process
assert not reference.sharded
steps = []
# Step 0: the trajectories split over both ranks. Step 1: all of them on rank 0, none on rank 1.
for step, all_on_rank0 in enumerate((False, True)):
    trajs, advantages = trajectories(10, seed=step), torch.linspace(-1.0, 1.0, 10)
    start, end = ((0, 10) if dist.is_main else (0, 0)) if all_on_rank0 else dist.shard_bounds(10)
    metrics = actor.update(batch_of(trajs[start:end], advantages[start:end], range(start, end)))
    ref_metrics = reference.update(batch_of(trajs, advantages, range(10)))
    sync_weights(actor, engine, bucket_bytes=4096)  # many small buckets
    full = {k: v.detach().clone() for bucket in actor.iter_weights() for k, v in bucket}
    served = engine.model.state_dict()
    ref = reference.model.state_dict()
    steps.append({
        "mine": end - start,
        "engine_equals_actor": all(torch.equal(served[k], full[k]) for k in full),
        "engine_keys": sorted(served) == sorted(full),
        "changed": max(float((served[k] - initial[k]).abs().max()) for k in full),
        "vs_one_process": max(float((full[k] - ref[k]).abs().max()) for k in full),
        "metrics": metrics,
        "one_process": ref_metrics,
    })
json.dump(steps, open(f"{out}.{dist.rank}", "w"))
engine.close()
# Both ranks done before either tears the group down (a rank leaving while the other is still in a
# collective aborts the process).
torch.distributed.barrier()
torch.distributed.destroy_process_group()
"""


def test_sharded_actor_hands_exact_weights_to_every_engine(tmp_path):
    script, out = tmp_path / "worker.py", tmp_path / "result"
    script.write_text(_WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in (0, 1):
        steps = json.loads((tmp_path / f"result.{rank}").read_text())
        assert [s["mine"] for s in steps] == ([5, 10] if rank == 0 else [5, 0])
        for s in steps:
            # Bit-exact: the engine serves the very values the sharded actor holds.
            assert s["engine_keys"] and s["engine_equals_actor"], (rank, s)
            assert s["changed"] > 1e-4, "the update moved nothing: the hand-off check would be vacuous"
            # And those values are one process's update of the whole batch (fp32 sums in another order).
            assert s["vs_one_process"] < 1e-5, (rank, s)
            assert_metrics_match(s["metrics"], s["one_process"], ["actor/grad_norm"], rel=1e-4, where=rank)
            losses = ["actor/loss", "actor/kl_loss"]
            assert_metrics_match(s["metrics"], s["one_process"], losses, rel=1e-4, abs=1e-6, where=rank)
        # Step 0 moved the policy away from the reference: step 1's KL term is live.
        assert steps[1]["one_process"]["actor/kl_loss"] > 1e-6
