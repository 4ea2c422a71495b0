"""The collector: where a step's trajectories come from, and where the new weights go.

The trainer's step reads collect -> advantages -> batch -> update -> publish. Everything about
collection is here: the problem stream, the rollouts and their seeds, the group ids, scoring,
dynamic sampling's refills, the engine's sleep/wake around the update, and the weight hand-off.

    collected = collector.collect(step, stage)      # this rank's samples, scored
    ...                                             # advantages, batch (the trainer)
    with collector.update_window():                 # the engine is idle (asleep) meanwhile
        metrics = actor.update(batch)
    collector.publish(actor)                        # the new weights to the engine

`SyncCollector` is the synchronous collector: every step rolls out its problems from scratch
under the weights just published and waits for the last trajectory. The asynchronous one
(`cir.training.async_collector`) keeps trajectories in flight across steps.

A trajectory carries what the batch needs, set when the collector creates it and never changed
afterwards: its group (the samples of one prompt whose rewards form its baseline) and its
position in the step's global list of samples. With dynamic sampling a step trains a subset of
what it sampled; each trained `Sample` then carries its position in the global list of trained
samples (the mini-batch it joins is that position modulo `optim.mini_batches`).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field, replace

import torch

from cir.algorithms import groups_to_keep, informative_groups, missing_groups
from cir.data import Problem, ProblemSampler
from cir.prompts import prompt_token_ids
from cir.rewards import RewardResult, score_trajectories
from cir.rollout import rollout, sample_seed
from cir.training.actor import sync_weights
from cir.training.faults import Exclusion, count_groups, fault_survivors, first_groups
from cir.trajectory import Trajectory


@dataclass(frozen=True)
class Sample:
    """One scored trajectory of the step. `position`: where it sits in the step's global list of
    trained samples (-1: not trained)."""

    trajectory: Trajectory
    reward: RewardResult
    position: int = -1


@dataclass
class Collected:
    """One step's rollouts on this rank: every sample (for the metrics) and those trained on."""

    samples: list[Sample]
    trained: list[Sample]
    reward_seconds: float
    # What the collector measured beyond the samples themselves (asynchronous: staleness, ...).
    metrics: dict[str, float] | None = None
    # What faults left out of the loss (`cir.training.faults`).
    excluded: Exclusion = field(default_factory=Exclusion)

    @property
    def trajectories(self) -> list[Trajectory]:
        return [s.trajectory for s in self.samples]

    @property
    def rewards(self) -> list[RewardResult]:
        return [s.reward for s in self.samples]


def group_id(round_: int, position: int) -> int:
    """The group id of the problem at global `position` of refill round `round_`."""
    return round_ * 1_000_000 + position


class SyncCollector:
    """Every step: draw the step's problems, roll out this rank's share under the current weights,
    score, refill (dynamic sampling); the engine sleeps while the actor updates."""

    def __init__(self, cfg, *, engine, sandbox, tokenizer, template, problems: list[Problem], dist, device):
        self.cfg = cfg
        self.device = device
        self.engine = engine
        self.sandbox = sandbox
        self.tokenizer = tokenizer
        self.template = template
        self.dist = dist
        self.sampler = ProblemSampler(problems, batch_size=cfg.algo.prompts_per_step, seed=cfg.run.seed)

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    # -- state ---------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])

    # -- collect -------------------------------------------------------------------------------

    def collect(self, step: int, stage) -> Collected:
        """This rank's samples of the step (`_collect`), with the engine's busy share over the
        collection: the share of its wall time the engine spent in forward passes, averaged over
        ranks (`engine/rollout_busy_share`). Near 1, generation is the bottleneck and the
        asynchronous collector has little idle time to fill; well below 1, the step waits on
        the sandbox or a long tail, which it can hide."""
        before = self.engine.activity()
        collected = self._collect(step, stage)
        spent = self.engine.activity() - before
        busy = spent.busy_s / spent.wall_s if spent.wall_s > 0 else 0.0
        share = self.dist.mean_metrics({"engine/rollout_busy_share": busy})
        collected.metrics = {**(collected.metrics or {}), **share}
        return collected

    def _collect(self, step: int, stage) -> Collected:
        """Roll out this rank's share of the step's problems and score them. With dynamic
        sampling, groups whose rewards are all equal are dropped and the batch is refilled from
        the next problems, for at most `algo.max_refill_rounds` more rounds; then the step keeps
        the first `algo.prompts_per_step` informative groups in global order (`groups_to_keep`).
        Trajectories with a faulted reward, and groups left with too few survivors, are never
        trained on (`cir.training.faults.fault_survivors`)."""
        algo = self.cfg.algo
        rounds = 1 + (algo.max_refill_rounds if algo.dynamic_sampling else 0)
        problems = self.sampler.next_batch()
        everything: list[Sample] = []
        t_reward, excluded = 0.0, Exclusion()
        kept_by_round: list[list[Sample]] = []
        for round_ in range(rounds):
            batch = self.rollout_problems(problems, stage, step=step, salt=round_)
            t0 = time.perf_counter()
            answers = {group_id(round_, i): p.answer for i, p in enumerate(problems)}
            scored = score_trajectories(
                batch, [answers[t.group] for t in batch], self.tokenizer, self.cfg.reward, stage.max_response_tokens
            )
            t_reward += time.perf_counter() - t0
            survivors, lost = fault_survivors([r.fault is not None for r in scored], [t.group for t in batch])
            excluded += lost
            if not algo.dynamic_sampling:
                samples = [Sample(t, r) for t, r in zip(batch, scored)]
                trained = [Sample(batch[i], scored[i], batch[i].position) for i in survivors]
                return Collected(everything + samples, trained, t_reward, excluded=excluded)
            everything += [Sample(t, r) for t, r in zip(batch, scored)]
            batch, scored = [batch[i] for i in survivors], [scored[i] for i in survivors]
            keep = informative_groups(
                torch.tensor([r.reward for r in scored]), torch.tensor([t.group for t in batch])
            ).tolist()
            kept_by_round.append([Sample(t, r) for t, r, k in zip(batch, scored, keep) if k])
            found = sum(count_groups([s.trajectory.group for s in kept]) for kept in kept_by_round)
            missing = missing_groups(found, algo.prompts_per_step, self.dist)
            if missing <= 0:
                break
            problems = self.sampler.take(missing)
        keep, first = self._groups_to_keep([count_groups([s.trajectory.group for s in kept]) for kept in kept_by_round])
        trained = []
        for kept, n, index in zip(kept_by_round, keep, first):
            count, slots = first_groups([s.trajectory.group for s in kept], n, index, algo.group_size)
            trained += [replace(s, position=slot) for s, slot in zip(kept[:count], slots)]
        return Collected(everything, trained, t_reward, excluded=excluded)

    def _groups_to_keep(self, my_counts: list[int]) -> tuple[list[int], list[int]]:
        """This rank's share of the step's informative groups per refill round, and where they go
        in the global list (see `cir.algorithms.groups_to_keep`); every rank's counts come from one
        sum over ranks."""
        counts = self.dist.counts_by_rank(my_counts)
        return groups_to_keep(counts, self.cfg.algo.prompts_per_step, self.dist.rank)

    def rollout_problems(self, problems: list[Problem], stage, *, step: int, salt: int = 0) -> list[Trajectory]:
        """`group_size` trajectories for each of this rank's share of `problems`. Seeds are a pure
        function of (run seed, step, round, global position, sample), so neither a resumed run
        nor the number of ranks changes what is sampled."""
        cfg = self.cfg
        g = cfg.algo.group_size
        start, end = self.dist.shard_bounds(len(problems))
        prompts, seeds, ids, groups = [], [], [], []
        for i in range(start, end):
            p = problems[i]
            ids_i = prompt_token_ids(self.template, p.problem, self.tokenizer)
            for j in range(g):
                prompts.append(ids_i)
                seeds.append(sample_seed(cfg.run.seed, step, salt, i, j))
                ids.append(p.id)
                groups.append(group_id(salt, i))
        return rollout(
            self.engine,
            self.sandbox,
            prompts,
            stage_rollout_config(cfg.rollout, stage),
            mode=cfg.run.rollout_mode,
            seeds=seeds,
            problem_ids=ids,
            groups=groups,
            positions=range(start * g, end * g),
        )

    # -- around the update ---------------------------------------------------------------------

    @contextlib.contextmanager
    def update_window(self):
        """The actor updates inside: the engine's memory (a GPU's KV cache) is the update's."""
        self.engine.sleep()
        yield
        if self.device.type == "cuda":
            # What the update freed is still cached by PyTorch; hand it back to the driver so the
            # engine's weights and KV cache (sized as a share of the whole GPU) fit again.
            torch.cuda.empty_cache()
        self.engine.wake()

    def publish(self, actor) -> None:
        """The actor's new weights to the engine, for the next step's rollouts."""
        sync_weights(actor, self.engine)

    def close(self) -> None:
        pass


def stage_rollout_config(rollout_cfg, stage):
    """The rollout settings of a schedule stage (tool budget, response length)."""
    return replace(rollout_cfg, tool_budget=stage.tool_budget, max_response_tokens=stage.max_response_tokens)
