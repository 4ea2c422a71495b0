"""The trainer: the RL loop of `cir train`, reading top to bottom like one step's data flow.

One step (`Trainer.step`):

    stage      = schedule.at(step)                            # tool budget, response length
    collected  = collect(stage)                               # sample problems, roll out, score
                                                              # (dynamic sampling refills here;
                                                              # the machine's faults are left out)
    advantages = compute_advantages(rewards, groups)          # group baseline, global whitening
    batch      = build_train_batch(trajectories, advantages)  # the one hand-off to tensors
    metrics    = actor.update(batch)                          # masked clipped loss, optimizer
    sync_weights(actor, engine)                               # new weights to the engine
    metrics   -> JSONL / TensorBoard / wandb

Each line calls into the module that owns it: `cir.rollout`, `cir.rewards`, `cir.algorithms`,
`cir.training.batch`, `cir.training.actor`, `cir.metrics`. The trainer names no concrete engine
(`cir.engines.make_engine`) and no task (`cir.tasks`). Everything needed to continue exactly is
checkpointed (`cir.training.checkpoint`); `--resume` continues from the newest checkpoint.
"""

from __future__ import annotations

import contextlib
import random
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from cir.algorithms import Schedule, compute_advantages, groups_to_keep, informative_groups, missing_groups
from cir.config_loader import ConfigError, dump_yaml, to_dict
from cir.data import DatasetError, Problem, ProblemSampler, drop_or_refuse_overlong, load_problem_set
from cir.distributed import DistributedContext
from cir.engines.factory import engine_dtype, make_engine
from cir.metrics import (
    MetricsLogger,
    NullMetricsLogger,
    plot_curves,
    read_metrics,
    step_metrics,
    truncate_metrics,
    write_jsonl,
)
from cir.models import load_policy
from cir.prompts import get_prompt, prompt_token_ids
from cir.rewards import RewardResult, grader_counters, score_trajectories
from cir.rollout import rollout, sample_seed
from cir.sandbox import Sandbox
from cir.training import checkpoint as ckpt
from cir.training.actor import Actor, sync_weights
from cir.training.batch import build_train_batch
from cir.training.config import check_run_inputs
from cir.training.faults import Exclusion, FaultWatch, count_groups, counter_delta, fault_survivors, first_groups
from cir.training.stop import StopRequest
from cir.trajectory import Trajectory

if TYPE_CHECKING:
    from cir.training.config import TrainConfig


@dataclass
class Collected:
    """One step's rollouts: every trajectory with its reward, and the ones that are trained on."""

    trajectories: list[Trajectory]
    rewards: list[RewardResult]
    trained: list[Trajectory]
    trained_rewards: list[RewardResult]
    trained_positions: list[int]  # each trained trajectory's position in the step's global list
    reward_seconds: float
    excluded: Exclusion  # what faults left out of the loss (`cir.training.faults`)


def _log(msg: str) -> None:
    print(f"[cir] {msg}", file=sys.stderr, flush=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_run_problems(cfg: TrainConfig) -> tuple[list[Problem], dict[str, list[Problem]]]:
    """The training problems and the held-out sets; a bad source is a ConfigError naming its key."""
    dc = cfg.data

    def load(spec: str, split: str, limit: int | None = None) -> list[Problem]:
        # A problem set a task registered gets that task's config section (None otherwise).
        return load_problem_set(
            spec,
            split=split,
            limit=limit,
            seed=cfg.run.seed,
            options=cfg.sections.get(spec),
            benchmark_dir=dc.benchmark_dir,
            problem_field=dc.problem_field,
            answer_field=dc.answer_field,
        )

    try:
        eval_sets = {Path(name).stem: load(name, "test", dc.eval_limit) for name in dc.eval}
    except DatasetError as e:
        raise ConfigError(f"data.eval: {e}") from None
    try:
        train = load(dc.train, "train")
    except DatasetError as e:
        raise ConfigError(f"data.train={dc.train!r}: {e}") from None
    if not train:
        raise ConfigError(f"data.train={dc.train!r} holds no problems")
    return train, eval_sets


class Trainer:
    """Holds the run's parts (actor, engine, sandbox, problem stream, logger) and runs the loop."""

    def __init__(self, cfg: TrainConfig, *, resume: bool | str = False, dist: DistributedContext | None = None):
        self.cfg = cfg
        self.dist = dist or DistributedContext.from_environment()
        self.out_dir = Path(cfg.run.out_dir)
        # Cheap checks and data first: a typo shows in seconds, not after minutes of model loading.
        check_run_inputs(cfg)
        resume_from = self._resume_path(resume)
        self.train_problems, self.eval_sets = load_run_problems(cfg)
        self.template = get_prompt(cfg.data.prompt)

        self.out_dir.mkdir(parents=True, exist_ok=True)
        if cfg.run.threads > 0:
            torch.set_num_threads(cfg.run.threads)
        seed_everything(cfg.run.seed + self.dist.rank)
        self.device = resolve_device(cfg.run.device)
        if resume_from is not None:
            self._say(f"resuming from {resume_from}")
        # On a GPU the policy is loaded on the CPU: the engine takes its copy first (vLLM sizes its
        # KV cache from the memory it finds free), then the actor moves the model onto the GPU
        # (FSDP2 one layer at a time, so no rank ever holds the whole model there).
        load_device = torch.device("cpu") if self.device.type == "cuda" else self.device
        model, self.tokenizer, self.extra_metrics = self._load_policy(load_device, checkpoint=resume_from)
        # With the tokenizer at hand and before the engine starts: a prompt with no room for a
        # response in the model's context is refused (or dropped) now, not hours in when drawn.
        self._check_prompt_lengths(getattr(model.config, "max_position_embeddings", None))
        oc = cfg.optim
        # The engine gets its own copy first: sharding (FSDP2) replaces the actor's parameters.
        # Under torchrun every rank builds its own engine here, at the same point: vLLM's start-up
        # is collective over the job's process group (cir.engines.vllm).
        self.engine = make_engine(
            cfg.run.engine,
            model,
            self.tokenizer,
            max_batch_size=cfg.run.engine_max_batch,
            seed=cfg.run.seed,
            device=self.device,
            dtype=getattr(torch, engine_dtype(cfg.run.engine_dtype, self.device.type, _dtype_name(model))),
            memory_fraction=cfg.run.engine_memory_fraction,
        )
        if self.dist.world_size == 1:
            model.to(self.device)
        # The KL reference is the run's initial policy: a resumed run loads it from model.path again.
        reference = None
        if resume_from is not None and cfg.algo.kl_coef > 0:
            reference = self._load_policy(load_device)[0]
            if self.dist.world_size == 1:
                reference.to(self.device)
        self.actor = Actor(
            model,
            self.tokenizer,
            oc,
            cfg.algo,
            total_optimizer_steps=cfg.run.steps * oc.ppo_epochs * oc.mini_batches,
            sharding=cfg.sharding,
            dist=self.dist,
            reference=reference,
        )
        self.sampler = ProblemSampler(self.train_problems, batch_size=cfg.algo.prompts_per_step, seed=cfg.run.seed)
        self.schedule = Schedule.from_config(cfg.schedule, cfg.rollout.tool_budget, cfg.rollout.max_response_tokens)
        self.step_count = 0
        if resume_from is not None:
            self._load_state(resume_from)

        self.sandbox = Sandbox.from_config(cfg.sandbox)
        sc = cfg.sandbox
        self.fault_watch = FaultWatch(
            warn_share=sc.fault_warn_share, stop_share=sc.fault_stop_share, stop_steps=sc.fault_stop_steps
        )
        self._counters_seen = (self.sandbox.counters(), grader_counters())
        # On resume, the held-out evaluation logged at step 0 (if any) is the run's "before".
        self._logged_before: dict | None = None
        if resume_from is not None and self.dist.is_main:
            # Steps logged after the checkpoint (a run that crashed later) are redone now.
            kept = truncate_metrics(self.out_dir / "metrics.jsonl", self.step_count)
            step0 = {k: v for row in kept if row.get("step") == 0 for k, v in row.items() if k.startswith("eval/")}
            self._logged_before = step0 or None
        # Rank 0 logs, evaluates and writes; metrics are already reduced over ranks.
        self.logger = (
            NullMetricsLogger()
            if not self.dist.is_main
            else MetricsLogger(
                self.out_dir,
                tensorboard=cfg.run.tensorboard,
                wandb=cfg.run.wandb,
                wandb_project=cfg.run.wandb_project,
                config=to_dict(cfg),
                resume=resume_from is not None,
            )
        )
        if self.dist.is_main:
            (self.out_dir / "config.yaml").write_text(dump_yaml(cfg))

    def _load_policy(self, device: torch.device, checkpoint: Path | None = None):
        """(model, tokenizer, metrics): `model.path`'s, or the checkpoint's when resuming. A
        builder a task registered gets that task's config section."""
        cfg = self.cfg
        return load_policy(
            cfg.model,
            device,
            checkpoint=checkpoint,
            seed=cfg.run.seed,
            options=cfg.sections.get(cfg.model.path),
            feedback_template=cfg.rollout.feedback_template,
            progress=cfg.run.progress and sys.stderr.isatty(),
        )

    def _say(self, msg: str) -> None:
        if self.dist.is_main:
            _log(msg)

    def _check_prompt_lengths(self, max_model_len: int | None) -> None:
        """`cir.data.drop_or_refuse_overlong` over the training and held-out problems."""
        count = lambda p: len(prompt_token_ids(self.template, p.problem, self.tokenizer))  # noqa: E731
        check = lambda key, problems: drop_or_refuse_overlong(  # noqa: E731
            key, problems, count, max_model_len, drop=self.cfg.data.drop_overlong, say=self._say
        )
        try:
            self.train_problems = check(f"data.train={self.cfg.data.train!r}", self.train_problems)
            self.eval_sets = {name: check(f"data.eval: {name}", problems) for name, problems in self.eval_sets.items()}
        except DatasetError as e:
            raise ConfigError(str(e)) from None

    def _resume_path(self, resume: bool | str) -> Path | None:
        if not resume:
            return None
        if isinstance(resume, str) and resume not in ("", "latest"):
            path = Path(resume)
        else:
            path = ckpt.latest_checkpoint(self.out_dir)
            if path is None:
                raise ConfigError(f"--resume: no checkpoint under {self.out_dir / 'checkpoints'}")
        problem = ckpt.why_not_resumable(path)
        if problem is not None:
            raise ConfigError(f"--resume: {problem}")
        return path

    # -- state ---------------------------------------------------------------------------------

    def save(self) -> Path:
        """A checkpoint of the run (every rank takes part; rank 0 writes)."""
        extra = {"sampler": self.sampler.state_dict()}
        return ckpt.save_checkpoint(
            self.out_dir, self.step_count, self.actor, self.dist, extra=extra, keep=self.cfg.run.keep_checkpoints
        )

    def _load_state(self, path: Path) -> None:
        state = ckpt.load_trainer_state(path)
        self.step_count = int(state["step"])
        self.actor.load_sharded_state(path / ckpt.OPTIMIZER_DIR, state)
        self.sampler.load_state_dict(state["extra"]["sampler"])
        ckpt.restore_rng(state, self.dist)

    # -- one RL step -----------------------------------------------------------------------------

    def step(self) -> dict[str, float]:
        cfg, stage = self.cfg, self.schedule.at(self.step_count)
        t_start = time.perf_counter()
        collected = self.collect(stage)
        sandbox_step, grader_step = self._fault_counters()
        t_rollout = time.perf_counter() - t_start - collected.reward_seconds

        t0 = time.perf_counter()
        trained = collected.trained
        advantages = compute_advantages(
            cfg.algo.advantage,
            torch.tensor([r.reward for r in collected.trained_rewards], dtype=torch.float32),
            torch.tensor([t.group for t in trained], dtype=torch.long),
            num_tokens=torch.tensor([t.num_model_tokens for t in trained]),
            dist=self.dist,
        )
        batch = build_train_batch(
            trained,
            advantages,
            pad_id=self.tokenizer.pad_token_id,
            device=self.device,
            mini_batches=cfg.optim.mini_batches,
            micro_batch_tokens=cfg.optim.micro_batch_tokens,
            packing=cfg.optim.packing,
            positions=collected.trained_positions,
            temperature=cfg.rollout.temperature if cfg.rollout.temperature > 0 else 1.0,
            max_response_tokens=stage.max_response_tokens,
        )
        (trained_anywhere,) = self.dist.sum_floats([len(trained)])
        self.engine.sleep()  # the engine's memory (a GPU's KV cache) is the update's meanwhile
        update_metrics = self.actor.update(batch) if trained_anywhere else {}
        if self.device.type == "cuda":
            # What the update freed is still cached by PyTorch; hand it back to the driver so the
            # engine's weights and KV cache (sized as a share of the whole GPU) fit again.
            torch.cuda.empty_cache()
        self.engine.wake()
        t_update = time.perf_counter() - t0

        sync_weights(self.actor, self.engine)
        self.step_count += 1
        times = {
            "rollout": t_rollout,
            "reward": collected.reward_seconds,
            "update": t_update,
            "step": time.perf_counter() - t_start,
        }
        metrics = step_metrics(
            collected.trajectories,
            collected.rewards,
            trained=len(trained),
            stage=stage,
            epoch=self.sampler.epoch,
            times=times,
            dist=self.dist,
            grader=grader_step,
            sandbox=sandbox_step,
            excluded=collected.excluded,
        )
        return {**metrics, **update_metrics}

    def _fault_counters(self):
        """The sandbox's and the grader's counts (retries, restarts, faults) since the last step's:
        nothing they went through between steps (an evaluation, a restart) goes uncounted."""
        sandbox, grader = self.sandbox.counters(), grader_counters()
        seen, self._counters_seen = self._counters_seen, (sandbox, grader)
        return counter_delta(seen[0], sandbox), grader - seen[1]

    def collect(self, stage) -> Collected:
        """Roll out this rank's share of the step's problems and score them. With dynamic
        sampling, groups whose rewards are all equal are dropped and the batch is refilled from
        the next problems, for at most `algo.max_refill_rounds` more rounds; then the step keeps
        the first `algo.prompts_per_step` informative groups in global order (`groups_to_keep`).
        Trajectories with a faulted reward, and groups left with too few survivors, are never
        trained on (`cir.training.faults.fault_survivors`)."""
        algo = self.cfg.algo
        rounds = 1 + (algo.max_refill_rounds if algo.dynamic_sampling else 0)
        problems = self.sampler.next_batch()
        everything, rewards, t_reward, excluded = [], [], 0.0, Exclusion()
        kept_by_round: list[list[tuple[Trajectory, RewardResult]]] = []
        for round_ in range(rounds):
            batch = self.rollout_problems(problems, stage, salt=round_)
            t0 = time.perf_counter()
            answers = {self._group(round_, i): p.answer for i, p in enumerate(problems)}
            scored = score_trajectories(
                batch, [answers[t.group] for t in batch], self.tokenizer, self.cfg.reward, stage.max_response_tokens
            )
            t_reward += time.perf_counter() - t0
            everything += batch
            rewards += scored
            survivors, lost = fault_survivors([r.fault is not None for r in scored], [t.group for t in batch])
            excluded += lost
            batch, scored = [batch[i] for i in survivors], [scored[i] for i in survivors]
            if not algo.dynamic_sampling:
                first = self.dist.shard_bounds(len(problems))[0] * algo.group_size
                positions = [first + i for i in survivors]
                return Collected(everything, rewards, batch, scored, positions, t_reward, excluded)
            keep = informative_groups(
                torch.tensor([r.reward for r in scored]), torch.tensor([t.group for t in batch])
            ).tolist()
            kept_by_round.append([(t, r) for t, r, k in zip(batch, scored, keep) if k])
            found = sum(count_groups([t.group for t, _ in kept]) for kept in kept_by_round)
            missing = missing_groups(found, algo.prompts_per_step, self.dist)
            if missing <= 0:
                break
            problems = self.sampler.take(missing)
        keep, first = self._groups_to_keep([count_groups([t.group for t, _ in kept]) for kept in kept_by_round])
        trained, positions = [], []
        for kept, n, index in zip(kept_by_round, keep, first):
            count, slots = first_groups([t.group for t, _ in kept], n, index, algo.group_size)
            trained += kept[:count]
            positions += slots
        return Collected(
            everything, rewards, [t for t, _ in trained], [r for _, r in trained], positions, t_reward, excluded
        )

    def _groups_to_keep(self, my_counts: list[int]) -> tuple[list[int], list[int]]:
        """This rank's share of the step's informative groups per refill round, and where they go
        in the global list (see `cir.algorithms.groups_to_keep`); every rank's counts come from one
        sum over ranks."""
        grid = torch.zeros(self.dist.world_size, len(my_counts), dtype=torch.float64)
        grid[self.dist.rank] = torch.tensor(my_counts, dtype=torch.float64)
        counts = self.dist.all_reduce_sum(grid).long().tolist()
        return groups_to_keep(counts, self.cfg.algo.prompts_per_step, self.dist.rank)

    @staticmethod
    def _group(round_: int, position: int) -> int:
        """The group id of the problem at global `position` of refill round `round_`."""
        return round_ * 1_000_000 + position

    def rollout_problems(self, problems: list[Problem], stage, salt: int = 0) -> list[Trajectory]:
        """`group_size` trajectories for each of this rank's share of `problems`. Seeds are a pure
        function of (run seed, step, round, global position, sample), so neither a resumed run
        nor the number of ranks changes what is sampled."""
        cfg = self.cfg
        g = cfg.algo.group_size
        rollout_cfg = replace(cfg.rollout, tool_budget=stage.tool_budget, max_response_tokens=stage.max_response_tokens)
        start, end = self.dist.shard_bounds(len(problems))
        prompts, seeds, ids, groups = [], [], [], []
        for i in range(start, end):
            p = problems[i]
            ids_i = prompt_token_ids(self.template, p.problem, self.tokenizer)
            for j in range(g):
                prompts.append(ids_i)
                seeds.append(sample_seed(cfg.run.seed, self.step_count, salt, i, j))
                ids.append(p.id)
                groups.append(self._group(salt, i))
        return rollout(
            self.engine,
            self.sandbox,
            prompts,
            rollout_cfg,
            mode=cfg.run.rollout_mode,
            seeds=seeds,
            problem_ids=ids,
            groups=groups,
        )

    # -- evaluation and the loop ----------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        """Held-out metrics. Every rank evaluates its share of each set's problems; rank 0 gets
        all the rows, computes the metrics and writes the rows; other ranks return {}."""
        from cir.evaluation import evaluate_sharded

        stage = self.schedule.at(self.step_count)
        cfg = replace(self.cfg.rollout, tool_budget=stage.tool_budget, max_response_tokens=stage.max_response_tokens)
        out: dict[str, float] = {}
        for name, problems in self.eval_sets.items():
            res = evaluate_sharded(
                self.dist,
                self.engine,
                self.sandbox,
                problems,
                template=self.template,
                rollout_config=cfg,
                reward_config=self.cfg.reward,
                samples=self.cfg.run.eval_samples,
                temperature=self.cfg.run.eval_temperature,
                seed=self.cfg.run.seed,
                mode=self.cfg.run.rollout_mode,
            )
            if res is None:  # not rank 0: its rows went there
                continue
            prefix = "eval/" if len(self.eval_sets) == 1 else f"eval/{name}/"
            out.update({prefix + k: v for k, v in res.metrics.items()})
            self._write_eval_rows(name, res.rows)
        return out

    def _write_eval_rows(self, name: str, rows: list[dict]) -> None:
        """Every held-out sample (problem, response as decoded, grade, tool calls) of this
        evaluation, to `eval/step_NNNNNN_<set>.jsonl` in the run folder."""
        folder = self.out_dir / "eval"
        folder.mkdir(parents=True, exist_ok=True)
        write_jsonl(folder / f"step_{self.step_count:06d}_{name}.jsonl", rows)

    def fit(self) -> dict:
        """Evaluate, train `run.steps` steps, evaluate again and save; a stop request (Ctrl-C,
        SIGTERM) ends the loop after the current step with a checkpoint instead."""
        before = self._evaluate_before()
        last: dict = {}
        with StopRequest() as stop, self._progress_bar() as bar:
            while self.step_count < self.cfg.run.steps:
                last = self._step_and_log(bar)
                verdict = self.fault_watch.check(self.step_count, last["fault/sandbox_calls"], last["tool/calls"])
                if verdict.action == "stop":
                    return self._stopped(before, last, fault=verdict.message)
                if verdict.action == "warn":
                    self._say(verdict.message)
                if stop.agreed(self.dist):
                    return self._stopped(before, last)
                if self._due(self.cfg.run.save_every):
                    self.save()
        return self._finish(before, last)

    def _evaluate_before(self) -> dict | None:
        """The held-out numbers before training: measured now, or on resume the ones logged then."""
        if self.step_count > 0:
            return self._logged_before
        if not (self.cfg.run.eval_at_start and self.eval_sets):
            return None
        t0 = time.perf_counter()
        before = self.evaluate()
        self.logger.log(0, {**before, **self.extra_metrics})
        self._say(f"held-out before training: {_brief(before)} ({time.perf_counter() - t0:.0f}s)")
        return before

    def _step_and_log(self, bar) -> dict:
        """One step, the held-out evaluation when it is due, then its metrics logged and shown."""
        metrics = self.step()
        if self._due(self.cfg.run.eval_every):
            metrics.update(self.evaluate())
        self.logger.log(self.step_count, metrics)
        self._show_progress(self.step_count, metrics, bar)
        return metrics

    def _due(self, every: int) -> bool:
        """Whether a thing done every `every` steps (0: never) falls after this step; the last
        step is left to `_finish`."""
        step = self.step_count
        return bool(every) and step % every == 0 and step < self.cfg.run.steps

    def _stopped(self, before: dict | None, last: dict, fault: str | None = None) -> dict:
        """Save and end the loop: asked to (a signal), or with `fault`, the message of a run whose
        sandbox kept failing (`cir.training.faults.FaultWatch`; `cir train` exits 3 with it)."""
        path = self.save()
        why = f": {fault}" if fault else ""
        self._say(f"stopped at step {self.step_count}{why}; saved {path} (continue with --resume)")
        return {"before": before, "after": None, "last": last, "checkpoint": str(path), "stopped": True, "fault": fault}

    def _finish(self, before: dict | None, last: dict) -> dict:
        after = None
        if self.eval_sets:
            after = self.evaluate()
            self.logger.log(self.step_count, after)
            self._say(f"held-out after training: {_brief(after)}")
        path = self.save()
        self._say(f"checkpoint: {path}")
        plot = None
        if self.cfg.run.plot and self.dist.is_main:
            plot = plot_curves(read_metrics(self.logger.path), self.out_dir / "curves.png")
            if plot:
                self._say(f"curves: {plot}")
        return {
            "before": before,
            "after": after,
            "last": last,
            "checkpoint": str(path),
            "plot": str(plot) if plot else None,
            "stopped": False,
            "fault": None,
        }

    def _progress_bar(self):
        """A progress bar on rank 0's terminal (a context manager yielding None elsewhere)."""
        if not (self.cfg.run.progress and sys.stderr.isatty() and self.dist.is_main):
            return contextlib.nullcontext(None)
        from tqdm.auto import tqdm

        return tqdm(
            total=self.cfg.run.steps,
            initial=self.step_count,
            desc="train",
            dynamic_ncols=True,
            file=sys.stderr,
            mininterval=1.0,
        )

    def _show_progress(self, step: int, metrics: dict, bar) -> None:
        if bar is not None:
            bar.update(1)
            bar.set_postfix(
                reward=f"{metrics['reward/mean']:.2f}",
                acc=f"{metrics['reward/accuracy']:.2f}",
                tools=f"{metrics['tool/calls_per_traj']:.2f}",
            )
        else:
            self._say(
                f"step {step}: reward {metrics['reward/mean']:.3f} acc {metrics['reward/accuracy']:.3f} "
                f"tool calls {metrics['tool/calls_per_traj']:.2f} ({metrics['time/step_s']:.1f}s)"
            )

    def close(self) -> None:
        for name in ("engine", "sandbox"):
            obj = getattr(self, name, None)
            if obj is not None:
                obj.close()
        if hasattr(self, "logger"):
            self.logger.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _dtype_name(model) -> str:
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def _brief(m: dict) -> str:
    keys = [k for k in m if k.endswith("accuracy") or k.endswith("tool_calls")]
    return ", ".join(f"{k.replace('eval/', '')} {m[k]:.3f}" for k in sorted(keys))
