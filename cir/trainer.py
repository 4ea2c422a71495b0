"""The trainer: `cir train`.

One RL step, top to bottom (`Trainer.step`):

    problems  = sampler.next_batch()                       # prompts_per_step problems
    trajs     = rollout(engine, sandbox, prompts x group)  # stop at fences, execute, feed back
    rewards   = compute_rewards(...)                       # boxed answer graded by math-verify
    adv       = compute_advantages(...)                    # REINFORCE++ group baseline, GRPO, ...
    (dynamic sampling drops all-equal groups and refills from the next problems)
    old_lp    = log-probs under the policy that sampled    # skipped when strictly on-policy
    update    : micro-batches under a token budget, masked clipped loss, AdamW
    engine    <- new weights
    metrics   -> JSONL / TensorBoard / wandb

Everything needed to continue exactly is checkpointed (`cir.checkpoint`); `--resume`
continues from the newest checkpoint of the run's folder.
"""

from __future__ import annotations

import hashlib
import math
import random
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from cir import checkpoint as ckpt
from cir.algorithms import Schedule, compute_advantages, informative_groups
from cir.config import TrainConfig, dump_yaml, load_train_config
from cir.configuration import ConfigError, to_dict
from cir.data import Problem, ProblemSampler, load_problems
from cir.metrics import MetricsLogger, plot_curves, read_metrics, truncate_metrics, write_jsonl
from cir.policy import collate, micro_batch_loss, micro_batch_weight, plan_micro_batches, token_logprobs
from cir.prompts import get_prompt, prompt_token_ids
from cir.rewards import compute_rewards, reward_info_from_trajectory
from cir.rollout import rollout, rollout_stats
from cir.trajectory import Trajectory

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


class Trainer:
    """Owns the policy, optimizer, engine, sandbox, data stream and logger of one run."""

    def __init__(self, cfg: TrainConfig, *, resume: bool | str = False):
        self.cfg = cfg
        self.out_dir = Path(cfg.run.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if cfg.run.threads > 0:
            torch.set_num_threads(cfg.run.threads)
        seed_everything(cfg.run.seed)
        self.device = resolve_device(cfg.run.device)
        self.is_demo = cfg.model.path == "demo"
        self.template = self._prompt_template()
        self.extra_metrics: dict[str, float] = {}

        resume_from = self._resume_path(resume)
        self.model, self.tokenizer = self._build_policy(resume_from)
        self.train_problems, self.eval_sets = self._load_data()
        self.sampler = ProblemSampler(self.train_problems, batch_size=cfg.algo.prompts_per_step, seed=cfg.run.seed)
        self.schedule = Schedule.from_config(cfg.schedule, cfg.rollout.tool_budget, cfg.rollout.max_response_tokens)
        self.optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad],
            lr=cfg.optim.lr,
            betas=(cfg.optim.beta1, cfg.optim.beta2),
            eps=cfg.optim.eps,
            weight_decay=cfg.optim.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_lambda)
        self.ref_model = self._reference_model() if cfg.algo.kl_coef > 0 else None
        self.step_count = 0
        if resume_from is not None:
            self._load_state(resume_from)

        from cir.engines.hf import HFEngine
        from cir.sandbox import Sandbox

        if cfg.run.engine != "hf":
            raise ConfigError(f"run.engine={cfg.run.engine!r}: this build has the 'hf' engine (transformers + torch)")
        self.engine = HFEngine(self.model, self.tokenizer, max_batch_size=cfg.run.engine_max_batch, seed=cfg.run.seed)
        sc = cfg.sandbox
        self.sandbox = Sandbox(workers=sc.workers, timeout_s=sc.timeout_s, memory_mb=sc.memory_mb, max_output_bytes=sc.max_output_bytes, preload=tuple(sc.preload))
        # On resume, the held-out evaluation logged at step 0 (if any) is the run's "before".
        self._logged_before: dict | None = None
        if resume_from is not None:
            # Steps logged after the checkpoint (a run that crashed later) are redone now.
            kept = truncate_metrics(self.out_dir / "metrics.jsonl", self.step_count)
            step0 = {k: v for row in kept if row.get("step") == 0 for k, v in row.items() if k.startswith("eval/")}
            self._logged_before = step0 or None
        self.logger = MetricsLogger(self.out_dir, tensorboard=cfg.run.tensorboard, wandb=cfg.run.wandb, wandb_project=cfg.run.wandb_project, config=to_dict(cfg), resume=resume_from is not None)
        (self.out_dir / "config.yaml").write_text(dump_yaml(cfg))

    # -- construction ------------------------------------------------------------------------

    def _prompt_template(self):
        if self.is_demo or self.cfg.data.prompt == "demo":
            from cir import demo  # registers the "demo" prompt

            return demo.DEMO_PROMPT if self.is_demo else get_prompt("demo")
        return get_prompt(self.cfg.data.prompt)

    def _resume_path(self, resume: bool | str) -> Path | None:
        if not resume:
            return None
        if isinstance(resume, str) and resume not in ("", "latest"):
            path = Path(resume)
        else:
            path = ckpt.latest_checkpoint(self.out_dir)
            if path is None:
                raise FileNotFoundError(f"--resume: no checkpoint under {self.out_dir / 'checkpoints'}")
        if not (path / ckpt.STATE_FILE).is_file():
            raise FileNotFoundError(f"--resume: {path} is not a cir checkpoint")
        return path

    def _build_policy(self, resume_from: Path | None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        mc = self.cfg.model
        dtype = DTYPES.get(mc.dtype)
        if dtype is None:
            raise ConfigError(f"model.dtype={mc.dtype!r}: choose one of {', '.join(DTYPES)}")
        if resume_from is not None:
            _log(f"resuming from {resume_from}")
            tokenizer = AutoTokenizer.from_pretrained(resume_from)
            model = AutoModelForCausalLM.from_pretrained(resume_from, dtype=dtype, attn_implementation=mc.attn_implementation)
        elif self.is_demo:
            tokenizer, model = self._build_demo_policy(dtype)
        else:
            tokenizer = AutoTokenizer.from_pretrained(mc.tokenizer or mc.path)
            model = AutoModelForCausalLM.from_pretrained(mc.path, dtype=dtype, attn_implementation=mc.attn_implementation)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        model.to(self.device)
        if mc.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        model.eval()
        return model, tokenizer

    def _build_demo_policy(self, dtype):
        from cir import demo

        d = self.cfg.demo
        tokenizer = demo.demo_tokenizer()
        model = demo.demo_model(tokenizer, d.hidden_size, d.num_layers, d.num_heads, seed=self.cfg.run.seed).to(device=self.device, dtype=dtype)
        exclude = {p.problem for p in self._demo_eval_problems()}
        _log(f"demo: warm-starting a {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M-parameter Qwen2 on mixed traces ({d.warmup_steps} steps)")
        info = demo.warm_start(
            model,
            tokenizer,
            steps=d.warmup_steps,
            batch_size=d.warmup_batch,
            lr=d.warmup_lr,
            tool_share={"hard": d.warmup_tool_share_hard, "easy": d.warmup_tool_share_easy},
            easy_share=d.easy_share,
            feedback_template=self.cfg.rollout.feedback_template,
            seed=self.cfg.run.seed,
            exclude=exclude,
            progress=self.cfg.run.progress and sys.stderr.isatty(),
        )
        _log(f"demo: warm start done in {info['warmup/seconds']:.0f}s (loss {info['warmup/loss']:.3f})")
        self.extra_metrics.update(info)
        return tokenizer, model

    def _demo_eval_problems(self) -> list[Problem]:
        from cir import demo

        return demo.demo_problems(self.cfg.demo.eval_problems, seed=self.cfg.run.seed + 7_000_001, easy_share=self.cfg.demo.easy_share)

    def _load_data(self) -> tuple[list[Problem], dict[str, list[Problem]]]:
        dc = self.cfg.data
        eval_sets: dict[str, list[Problem]] = {}
        for name in dc.eval:
            if name == "demo":
                eval_sets["demo"] = self._demo_eval_problems()[: dc.eval_limit]
            else:
                eval_sets[Path(name).stem] = load_problems(name, split="test", limit=dc.eval_limit, benchmark_dir=dc.benchmark_dir, problem_field=dc.problem_field, answer_field=dc.answer_field)
        if dc.train == "demo":
            from cir import demo

            exclude = {p.problem for p in eval_sets.get("demo", [])}
            train = demo.demo_problems(self.cfg.demo.train_problems, seed=self.cfg.run.seed + 1, easy_share=self.cfg.demo.easy_share, exclude=exclude)
        else:
            train = load_problems(dc.train, split="train", benchmark_dir=dc.benchmark_dir, problem_field=dc.problem_field, answer_field=dc.answer_field)
        if not train:
            raise ConfigError(f"data.train={dc.train!r} holds no problems")
        return train, eval_sets

    def _reference_model(self):
        import copy

        ref = copy.deepcopy(self.model).eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        return ref

    def _lr_lambda(self, step: int) -> float:
        oc = self.cfg.optim
        warm = min(1.0, (step + 1) / oc.warmup_steps) if oc.warmup_steps > 0 else 1.0
        total = max(1, self.cfg.run.steps * oc.ppo_epochs * oc.mini_batches)
        frac = min(1.0, step / total)
        if oc.lr_schedule == "constant":
            decay = 1.0
        elif oc.lr_schedule == "cosine":
            decay = oc.min_lr_ratio + (1 - oc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac))
        elif oc.lr_schedule == "linear":
            decay = 1.0 - (1 - oc.min_lr_ratio) * frac
        else:
            raise ConfigError(f"optim.lr_schedule={oc.lr_schedule!r}: choose constant, cosine or linear")
        return warm * decay

    # -- state ---------------------------------------------------------------------------------

    def save(self) -> Path:
        path = ckpt.save_checkpoint(
            self.out_dir,
            self.step_count,
            self.model,
            self.tokenizer,
            self.optimizer,
            self.scheduler,
            extra={"sampler": self.sampler.state_dict()},
            keep=self.cfg.run.keep_checkpoints,
        )
        return path

    def _load_state(self, path: Path) -> None:
        state = ckpt.load_trainer_state(path)
        self.step_count = int(state["step"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["extra"]["sampler"])
        ckpt.set_rng_state(state["rng"])

    # -- one RL step -----------------------------------------------------------------------------

    def rollout_problems(self, problems: Sequence[Problem], step: int, rollout_cfg, salt: int = 0) -> list[Trajectory]:
        """`group_size` trajectories per problem; seeds are a pure function of (run seed, step,
        position), so a resumed run samples exactly what the uninterrupted one did."""
        g = self.cfg.algo.group_size
        prompts, seeds, rows = [], [], []
        for i, p in enumerate(problems):
            ids = prompt_token_ids(self.template, p.problem, self.tokenizer)
            for j in range(g):
                prompts.append(ids)
                seeds.append(_seed(self.cfg.run.seed, step, salt, i, j))
                rows.append({"id": p.id, "answer": p.answer})
        trajs = rollout(self.engine, self.sandbox, prompts, rollout_cfg, mode=self.cfg.run.rollout_mode, seeds=seeds, problems=rows)
        for k, t in enumerate(trajs):
            t.group = salt * 1_000_000 + k // g
        return trajs

    def score(self, trajs: list[Trajectory], problems: Sequence[Problem], max_tokens: int) -> None:
        g = self.cfg.algo.group_size
        texts = [t.text(self.tokenizer) for t in trajs]
        refs = [problems[k // g].answer for k in range(len(trajs))]
        infos = [reward_info_from_trajectory(t, max_tokens) for t in trajs]
        for t, r in zip(trajs, compute_rewards(None, texts, refs, infos, self.cfg.reward)):
            t.reward, t.reward_info = r.reward, {"correct": r.correct, **r.info}

    def step(self) -> dict[str, float]:
        cfg, step = self.cfg, self.step_count
        stage = self.schedule.at(step)
        rollout_cfg = replace(cfg.rollout, tool_budget=stage.tool_budget, max_response_tokens=stage.max_response_tokens)
        t_start = time.perf_counter()
        self.model.eval()

        # 1. Rollout and rewards (with dynamic sampling: keep informative groups, refill).
        problems = self.sampler.next_batch()
        trajs: list[Trajectory] = []
        all_trajs: list[Trajectory] = []
        t_reward = 0.0
        for round_ in range(1 + (cfg.algo.max_refill_rounds if cfg.algo.dynamic_sampling else 0)):
            batch = self.rollout_problems(problems, step, rollout_cfg, salt=round_)
            t0 = time.perf_counter()
            self.score(batch, problems, stage.max_response_tokens)
            t_reward += time.perf_counter() - t0
            all_trajs += batch
            if not cfg.algo.dynamic_sampling:
                trajs = batch
                break
            keep = informative_groups(torch.tensor([t.reward for t in batch]), torch.tensor([t.group for t in batch]))
            trajs += [t for t, k in zip(batch, keep.tolist()) if k]
            missing = cfg.algo.prompts_per_step - len(trajs) // cfg.algo.group_size
            if missing <= 0:
                break
            problems = self.sampler.take(missing)
        trajs = trajs[: cfg.algo.prompts_per_step * cfg.algo.group_size]
        t_rollout = time.perf_counter() - t_start - t_reward

        # 2. Advantages, then the policy update.
        t0 = time.perf_counter()
        update_metrics = self.update(trajs, stage.max_response_tokens) if trajs else {}
        t_update = time.perf_counter() - t0

        # 3. New weights to the engine (a no-op when it shares the trainer's model).
        self.engine.load_weights(self.model.named_parameters())
        self.step_count += 1

        # 4. Metrics.
        rewards = [t.reward for t in all_trajs]
        stats = rollout_stats(all_trajs)
        model_tokens = sum(t.num_model_tokens for t in all_trajs)
        step_s = time.perf_counter() - t_start
        metrics = {
            "reward/mean": float(np.mean(rewards)),
            "reward/accuracy": float(np.mean([bool(t.reward_info.get("correct")) for t in all_trajs])),
            "tool/calls_per_traj": stats["tool_calls_per_traj"],
            "tool/error_rate": stats["exec_error_rate"],
            "tool/timeout_rate": stats["timeout_rate"],
            "response/model_tokens_mean": stats["model_tokens_mean"],
            "response/feedback_token_share": stats["feedback_token_share"],
            "response/truncated_share": stats.get("finish_length", 0.0),
            "schedule/tool_budget": stage.tool_budget,
            "schedule/max_response_tokens": stage.max_response_tokens,
            "data/trajectories": len(all_trajs),
            "data/trajectories_trained": len(trajs),
            "data/epoch": self.sampler.state_dict().get("epoch", 0),
            "time/rollout_s": t_rollout,
            "time/sandbox_busy_s": sum(c.wall_ms for t in all_trajs for c in t.tool_calls) / 1000.0,
            "time/reward_s": t_reward,
            "time/update_s": t_update,
            "time/step_s": step_s,
            "perf/tokens_per_s": model_tokens / max(t_rollout, 1e-9),
            **update_metrics,
        }
        return metrics

    def update(self, trajs: list[Trajectory], max_tokens: int) -> dict[str, float]:
        cfg, algo, oc = self.cfg, self.cfg.algo, self.cfg.optim
        rewards = torch.tensor([t.reward for t in trajs], dtype=torch.float32)
        groups = torch.tensor([t.group for t in trajs])
        num_tokens = torch.tensor([t.num_model_tokens for t in trajs])
        adv = compute_advantages(algo.advantage, rewards, groups, num_tokens=num_tokens)
        pad = self.tokenizer.pad_token_id
        lengths = [len(t.prompt_ids) + len(t.response_ids) for t in trajs]
        temperature = cfg.rollout.temperature if cfg.rollout.temperature > 0 else 1.0

        # Strictly on-policy (one epoch, one mini-batch): the old policy is the current one, so
        # its log-probs come from the same forward (ratio exactly 1) and need no extra pass.
        on_policy = oc.ppo_epochs == 1 and oc.mini_batches == 1
        order = list(range(len(trajs)))
        minis = [order[i :: oc.mini_batches] for i in range(oc.mini_batches)]
        plans = [[[mini[k] for k in grp] for grp in plan_micro_batches([lengths[i] for i in mini], oc.micro_batch_tokens)] for mini in minis]
        batches = [[collate(trajs, idx, adv, pad, self.device) for idx in plan] for plan in plans]
        if not on_policy or self.ref_model is not None:
            with torch.no_grad():
                for plan in batches:
                    for mb in plan:
                        if not on_policy:
                            mb.old_logprobs = token_logprobs(self.model, mb, temperature=temperature, with_entropy=False, impl=algo.logprob_impl)[0]
                        if self.ref_model is not None:
                            mb.ref_logprobs = token_logprobs(self.ref_model, mb, temperature=temperature, with_entropy=False, impl=algo.logprob_impl)[0]

        self.model.train()
        sums: dict[str, float] = {}
        weight_total = 0.0
        grad_norms = []
        for _ in range(oc.ppo_epochs):
            for plan in batches:
                total_tokens = sum(mb.num_model_tokens for mb in plan)
                total_seqs = sum(mb.num_seqs for mb in plan)
                self.optimizer.zero_grad(set_to_none=True)
                for mb in plan:
                    loss, m = micro_batch_loss(self.model, mb, algo, temperature=temperature, max_response_tokens=max_tokens)
                    w = micro_batch_weight(mb, algo.aggregation, total_tokens, total_seqs)
                    (loss * w).backward()
                    tw = mb.num_model_tokens
                    weight_total += tw
                    sums["actor/loss"] = sums.get("actor/loss", 0.0) + float(loss.detach()) * tw
                    for k, v in m.items():
                        sums["actor/" + k] = sums.get("actor/" + k, 0.0) + float(v) * tw
                gn = torch.nn.utils.clip_grad_norm_(self.model.parameters(), oc.grad_clip if oc.grad_clip > 0 else float("inf"))
                grad_norms.append(float(gn))
                if math.isfinite(float(gn)):
                    self.optimizer.step()
                else:
                    _log(f"step {self.step_count}: non-finite grad norm, optimizer step skipped")
                self.scheduler.step()
        self.model.eval()
        out = {k: v / max(weight_total, 1) for k, v in sums.items()}
        out["actor/grad_norm"] = float(np.mean(grad_norms)) if grad_norms else 0.0
        out["actor/lr"] = self.scheduler.get_last_lr()[0]
        out["actor/advantage_abs_mean"] = float(adv.abs().mean())
        return out

    # -- evaluation and the loop ----------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        from cir.evaluate import evaluate

        stage = self.schedule.at(self.step_count)
        cfg = replace(self.cfg.rollout, tool_budget=stage.tool_budget, max_response_tokens=stage.max_response_tokens)
        out: dict[str, float] = {}
        for name, problems in self.eval_sets.items():
            res = evaluate(self.engine, self.sandbox, problems, template=self.template, rollout_config=cfg, reward_config=self.cfg.reward, samples=self.cfg.run.eval_samples, temperature=self.cfg.run.eval_temperature, seed=self.cfg.run.seed, mode=self.cfg.run.rollout_mode)
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
        cfg = self.cfg
        start_step = self.step_count
        before = None
        if cfg.run.eval_at_start and self.eval_sets and start_step == 0:
            t0 = time.perf_counter()
            before = self.evaluate()
            self.logger.log(0, {**before, **self.extra_metrics})
            _log(f"held-out before training: {_brief(before)} ({time.perf_counter() - t0:.0f}s)")
        elif start_step > 0:
            before = self._logged_before
        bar = None
        if cfg.run.progress and sys.stderr.isatty():
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.run.steps, initial=start_step, desc="train", dynamic_ncols=True, file=sys.stderr, mininterval=1.0)
        last = {}
        try:
            while self.step_count < cfg.run.steps:
                metrics = self.step()
                step = self.step_count
                if cfg.run.eval_every and step % cfg.run.eval_every == 0 and step < cfg.run.steps:
                    metrics.update(self.evaluate())
                self.logger.log(step, metrics)
                last = metrics
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(reward=f"{metrics['reward/mean']:.2f}", acc=f"{metrics['reward/accuracy']:.2f}", tools=f"{metrics['tool/calls_per_traj']:.2f}")
                else:
                    _log(f"step {step}: reward {metrics['reward/mean']:.3f} acc {metrics['reward/accuracy']:.3f} tool calls {metrics['tool/calls_per_traj']:.2f} ({metrics['time/step_s']:.1f}s)")
                if cfg.run.save_every and step % cfg.run.save_every == 0 and step < cfg.run.steps:
                    self.save()
        except KeyboardInterrupt:
            # Keep what was trained: a checkpoint that --resume continues from.
            if bar is not None:
                bar.close()
                bar = None
            path = self.save()
            _log(f"interrupted at step {self.step_count}; saved {path} (continue with --resume)")
            raise
        finally:
            if bar is not None:
                bar.close()
        after = None
        if self.eval_sets:
            after = self.evaluate()
            self.logger.log(self.step_count, after)
            _log(f"held-out after training: {_brief(after)}")
        path = self.save()
        _log(f"checkpoint: {path}")
        plot = None
        if cfg.run.plot:
            plot = plot_curves(read_metrics(self.logger.path), self.out_dir / "curves.png")
            if plot:
                _log(f"curves: {plot}")
        return {"before": before, "after": after, "last": last, "checkpoint": str(path), "plot": str(plot) if plot else None}

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


def _seed(*parts: int) -> int:
    """A sampling seed that is a pure function of its parts (stable across processes)."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 62) - 1)


def _brief(m: dict) -> str:
    keys = [k for k in m if k.endswith("accuracy") or k.endswith("tool_calls")]
    return ", ".join(f"{k.replace('eval/', '')} {m[k]:.3f}" for k in sorted(keys))


# ---------------------------------------------------------------------------------------------
# `cir train`


def register(parser) -> None:
    parser.add_argument("--config", default=None, help="a YAML file or a preset (demo, paper); default: the CPU demo")
    parser.add_argument("--resume", nargs="?", const="latest", default=None, help="continue from the newest checkpoint in run.out_dir (or from the given checkpoint folder)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override config fields, e.g. optim.lr=2e-6 algo.group_size=8")


def run(args) -> int:
    try:
        cfg = load_train_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"cir train: {e}", file=sys.stderr)
        return 2
    print(dump_yaml(cfg), file=sys.stderr)
    if args.print_config:
        return 0
    t0 = time.perf_counter()
    with Trainer(cfg, resume=args.resume or False) as trainer:
        result = trainer.fit()
        is_demo = trainer.is_demo
    if result["before"] and result["after"]:
        from cir.demo import summary_table

        strip = lambda m: {k.split("/", 1)[1] if k.startswith("eval/") else k: v for k, v in m.items()}  # noqa: E731
        title = "cir demo: held-out arithmetic, before vs after RL" if is_demo else "held-out evaluation, before vs after RL"
        print(f"\n{title}\n" + summary_table(strip(result["before"]), strip(result["after"])))
    print(f"\nrun folder: {cfg.run.out_dir} (metrics.jsonl, tensorboard/, checkpoints/, curves.png); {time.perf_counter() - t0:.0f}s in all")
    return 0
