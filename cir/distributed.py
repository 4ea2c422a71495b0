"""Rank, world size and the few reductions the RL math needs, present in one process too.

Every number the trainer computes over "the batch" is a number over the *global* batch: the
whitening statistics of REINFORCE++, the token and sequence totals that a loss aggregation
divides by, the metrics it logs. `DistributedContext` is the one place where those totals are
summed over ranks. With world size 1 (a plain `cir train`) each reduction is the identity, so
the single-process and the multi-process code paths are the same code.

Problems are sharded by position in the step's global list, and sampling seeds are derived
from that global position, so which rank rolls out a problem never changes what is sampled.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

T = TypeVar("T")


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    device: str = "cpu"  # where reductions run: "cuda" under NCCL, "cpu" under gloo

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in a world of {self.world_size}")

    @classmethod
    def from_environment(cls) -> DistributedContext:
        """The context of this process: torch.distributed's when it is initialised (torchrun),
        else a world of one."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
            return cls(rank=torch.distributed.get_rank(), world_size=torch.distributed.get_world_size(), device=device)
        return cls()

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs, writes reports and exports checkpoints."""
        return self.rank == 0

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of `tensor` over ranks (a new tensor; the input is untouched)."""
        if self.world_size == 1:
            return tensor.clone()
        out = tensor.to(self.device, copy=True)
        torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM)
        return out.to(tensor.device)

    def sum_floats(self, values: Sequence[float]) -> list[float]:
        """Sums over ranks of a few scalars, in one float64 reduction."""
        if self.world_size == 1:
            return [float(v) for v in values]
        return self.all_reduce_sum(torch.tensor(list(values), dtype=torch.float64)).tolist()

    def counts_by_rank(self, counts: Sequence[int]) -> list[list[int]]:
        """Every rank's `counts` (the same length on each), rows in rank order, in one reduction."""
        grid = torch.zeros(self.world_size, len(counts), dtype=torch.float64)
        grid[self.rank] = torch.tensor([float(c) for c in counts], dtype=torch.float64)
        return self.all_reduce_sum(grid).long().tolist()

    def max_int(self, value: int) -> int:
        """The largest `value` over ranks."""
        if self.world_size == 1:
            return int(value)
        out = torch.tensor([int(value)], dtype=torch.int64, device=self.device)
        torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.MAX)
        return int(out.item())

    def max_float(self, value: float) -> float:
        """The largest `value` over ranks."""
        if self.world_size == 1:
            return float(value)
        out = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.MAX)
        return float(out.item())

    def barrier(self) -> None:
        """Wait until every rank gets here (e.g. a folder rank 0 made exists before others write)."""
        if self.world_size > 1:
            torch.distributed.barrier()

    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Overwrite every rank's parameters and buffers of `module` with rank 0's, in place."""
        if self.world_size == 1:
            return
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                staged = tensor.detach().to(self.device)
                torch.distributed.broadcast(staged, src=0)
                tensor.copy_(staged)

    def weighted_mean_var(
        self, values: torch.Tensor, weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Total weight, mean and (population) variance of `values` weighted by `weights`, over
        all ranks.

        Two passes (the mean first, then the squared deviations from it), as a one-pass
        sum-of-squares formula loses precision when the mean is large against the spread.
        Returns 0-d tensors of `values`' dtype; mean and variance are 0 when the total is 0.
        """
        total, weighted = self.all_reduce_sum(torch.stack([weights.sum(), (weights * values).sum()])).unbind()
        if total <= 0:
            return total, values.new_zeros(()), values.new_zeros(())
        mean = weighted / total
        var = self.all_reduce_sum((weights * (values - mean) ** 2).sum()) / total
        return total, mean, var

    def mean_metrics(self, metrics: Mapping[str, float], weight: float = 1.0) -> dict[str, float]:
        """Metrics averaged over ranks, each rank's values weighted by `weight` (e.g. its
        number of trajectories). Every rank must pass the same keys in the same order."""
        if self.world_size == 1:
            return {k: float(v) for k, v in metrics.items()}
        keys = list(metrics)
        totals = self.sum_floats([float(metrics[k]) * weight for k in keys] + [weight])
        weight_sum = totals[-1]
        return {k: (t / weight_sum if weight_sum else 0.0) for k, t in zip(keys, totals[:-1])}

    def gather_to_main(self, obj: T) -> list[T] | None:
        """Every rank's `obj` (any picklable value), in rank order, on rank 0; None on the others.

        For results too uneven or too structured for a tensor reduction (the rows of a held-out
        evaluation); only rank 0 holds them all, as only rank 0 writes them. Every rank must call it.
        """
        if self.world_size == 1:
            return [obj]
        gathered: list[T] | None = [None] * self.world_size if self.is_main else None  # type: ignore[list-item]
        torch.distributed.gather_object(obj, gathered, dst=0)
        return gathered

    def shard_bounds(self, n: int) -> tuple[int, int]:
        """[start, end) of this rank's contiguous share of `n` items (sizes differ by at most 1)."""
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (1 if self.rank < extra else 0)

    def shard(self, items: Sequence[T]) -> list[T]:
        start, end = self.shard_bounds(len(items))
        return list(items[start:end])


def process_group_backend(device: str = "auto") -> str:
    """The backend for a run on `device` ("auto", "cpu" or "cuda", as `run.device`): NCCL for a
    run on CUDA ("auto" with CUDA available), gloo when the CPU is asked for or there is no CUDA.
    A CPU run on a machine with GPUs must not pick NCCL: every rank would claim a GPU
    (`set_device(LOCAL_RANK)`), and a rank beyond the machine's GPU count would fail."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device {device!r}: choose auto, cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda': no CUDA device is available")
    on_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    return "nccl" if on_cuda else "gloo"


def init_distributed(timeout_s: float = 1800.0, device: str = "auto") -> DistributedContext:
    """Join the process group when launched by `torchrun` (WORLD_SIZE > 1): NCCL with one GPU per
    rank for a run on CUDA, gloo for a run on the CPU (`process_group_backend`). A collective
    that waits longer than `timeout_s` fails instead of hanging, so one rank's crash ends the job."""
    import datetime
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return DistributedContext()
    if not torch.distributed.is_initialized():
        backend = process_group_backend(device)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistributedContext.from_environment()
