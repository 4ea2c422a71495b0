"""The distributed context with world size 1 is the plain computation; sharding covers a list
exactly once in order; REINFORCE++'s whitening reduced through it equals the plain formula;
objects gathered from two ranks reach rank 0 in rank order."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from cir.algorithms import compute_advantages
from cir.distributed import DistributedContext


def test_world_of_one_reductions_equal_the_plain_computation():
    dist = DistributedContext()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, dtype=torch.float64, generator=g)
    w = torch.rand(37, dtype=torch.float64, generator=g) * 5
    summed = dist.all_reduce_sum(x)
    assert torch.equal(summed, x) and summed is not x  # a copy, never the caller's tensor
    assert dist.sum_floats([1.5, 2.0, -3.25]) == [1.5, 2.0, -3.25]
    total, mean, var = dist.weighted_mean_var(x, w)
    plain_mean = (w * x).sum() / w.sum()
    assert float(total) == float(w.sum())
    assert float(mean) == float(plain_mean)
    assert float(var) == float((w * (x - plain_mean) ** 2).sum() / w.sum())
    total, mean, var = dist.weighted_mean_var(x, torch.zeros_like(w))
    assert (float(total), float(mean), float(var)) == (0.0, 0.0, 0.0)
    assert dist.mean_metrics({"a": 1.25, "b": -2.0}, weight=7) == {"a": 1.25, "b": -2.0}
    assert dist.counts_by_rank([3, 0, 7]) == [[3, 0, 7]]


def test_reinforce_pp_whitening_is_the_token_weighted_formula():
    g = torch.Generator().manual_seed(1)
    rewards = (torch.rand(24, generator=g) > 0.5).float() * 2 - 1
    groups = torch.arange(24) // 4
    tokens = torch.randint(1, 50, (24,), generator=g)
    got = compute_advantages("reinforce_pp_baseline", rewards, groups, num_tokens=tokens, dist=DistributedContext())
    r = rewards.double()
    centred = r - torch.stack([r[groups == k].mean() for k in groups.tolist()])
    w = tokens.double()
    mu = (w * centred).sum() / w.sum()
    sd = ((w * (centred - mu) ** 2).sum() / w.sum()).sqrt()
    torch.testing.assert_close(got, ((centred - mu) / (sd + 1e-6)).float(), rtol=0, atol=1e-7)
    assert torch.equal(got, compute_advantages("reinforce_pp_baseline", rewards, groups, num_tokens=tokens))


@pytest.mark.parametrize("world", [1, 2, 3, 8])
@pytest.mark.parametrize("n", [0, 1, 7, 16])
def test_shards_cover_the_list_once_in_order(world, n):
    items = list(range(n))
    shards = [DistributedContext(rank=r, world_size=world).shard(items) for r in range(world)]
    assert [x for s in shards for x in s] == items
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_rank_outside_the_world_is_rejected():
    with pytest.raises(ValueError, match="rank 2 is not in a world of 2"):
        DistributedContext(rank=2, world_size=2)
    assert DistributedContext.from_environment() == DistributedContext()


GATHER_SCRIPT = """
import json

import torch

from cir.distributed import init_distributed

# A CPU test asks for the CPU: gloo, even on a machine with GPUs (NCCL would claim GPU LOCAL_RANK).
dist = init_distributed(device="cpu")
print(f"rank {dist.rank} backend {torch.distributed.get_backend()} device {dist.device}", flush=True)
# Uneven and nested, as a held-out evaluation's rows are: rank r sends r + 1 rows.
got = dist.gather_to_main([{"rank": dist.rank, "row": i} for i in range(dist.rank + 1)])
print(f"rank {dist.rank} got " + json.dumps(got), flush=True)
# Every rank learns every rank's counts, rows in rank order.
print(f"rank {dist.rank} counts " + json.dumps(dist.counts_by_rank([dist.rank + 1, 10 * dist.rank])), flush=True)
# Both ranks done before either tears the group down (a rank leaving while the other is still in a
# collective aborts the process).
torch.distributed.barrier()
torch.distributed.destroy_process_group()
"""


def test_gather_to_main_and_counts_by_rank_across_two_ranks(tmp_path):
    assert DistributedContext().gather_to_main({"a": 1}) == [{"a": 1}]
    script = tmp_path / "gather.py"
    script.write_text(textwrap.dedent(GATHER_SCRIPT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = [[{"rank": 0, "row": 0}], [{"rank": 1, "row": 0}, {"rank": 1, "row": 1}]]
    assert f"rank 0 got {json.dumps(expected)}" in proc.stdout, proc.stdout
    assert "rank 1 got null" in proc.stdout, proc.stdout
    assert "rank 0 counts [[1, 0], [2, 10]]" in proc.stdout and "rank 1 counts [[1, 0], [2, 10]]" in proc.stdout
    assert "rank 0 backend gloo device cpu" in proc.stdout and "rank 1 backend gloo device cpu" in proc.stdout


def test_backend_follows_the_device_asked_for():
    from cir.distributed import process_group_backend

    assert process_group_backend("cpu") == "gloo"
    assert process_group_backend("auto") == ("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        assert process_group_backend("cuda") == "nccl"
    else:
        with pytest.raises(ValueError, match="no CUDA device"):
            process_group_backend("cuda")
    with pytest.raises(ValueError, match="'tpu'"):
        process_group_backend("tpu")
