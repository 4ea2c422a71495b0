"""The training run's configuration: one typed dataclass per section.

The defaults are the paper's recipe for a real run (REINFORCE++ with a group baseline,
clip 0.2/0.28, no KL, no entropy bonus, 16 samples per prompt, 128 prompts, lr 1e-6,
temperature 1.0, tool budget 2). ``cir train`` with no ``--config`` starts from the bundled
``demo`` preset instead (a tiny model on CPU); ``--config paper`` names the bundled paper
preset, and any other value is a YAML file. ``key=value`` arguments override single fields:

    cir train --config paper model.path=Qwen/Qwen2.5-Math-7B data.train=/data/train.jsonl
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from cir.configuration import ConfigError, dump_yaml, load
from cir.rewards import RewardConfig
from cir.rollout import RolloutConfig


@dataclass
class ModelConfig:
    # A Hugging Face model directory or hub name, or "demo" for the built-in tiny model that
    # the demo warm-starts itself.
    path: str = "demo"
    tokenizer: str | None = None  # default: the model's own
    dtype: str = "float32"  # float32 | bfloat16 | float16 (parameters and optimizer)
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False


@dataclass
class DataConfig:
    # A .jsonl/.json file, a folder, a benchmark short name (aime24, math500, ...), a Hugging
    # Face dataset name, or "demo" (the built-in arithmetic task).
    train: str = "demo"
    eval: list[str] = field(default_factory=lambda: ["demo"])
    eval_limit: int | None = None  # at most this many problems per eval set
    prompt: str = "cir"  # a prompt template name (cir.prompts)
    problem_field: str | None = None
    answer_field: str | None = None
    benchmark_dir: str | None = None  # where benchmark short names are looked up


@dataclass
class SandboxConfig:
    workers: int = 2
    timeout_s: float = 5.0
    memory_mb: int = 2048
    max_output_bytes: int = 16384
    preload: list[str] = field(default_factory=lambda: ["math", "fractions", "itertools", "sympy", "numpy"])


@dataclass
class AlgoConfig:
    advantage: str = "reinforce_pp_baseline"  # cir.algorithms: grpo, grpo_no_std, dr_grpo, rloo, reinforce_pp_baseline
    group_size: int = 16  # samples per prompt
    prompts_per_step: int = 128
    dynamic_sampling: bool = False  # drop groups whose rewards are all equal, refill from the next prompts
    max_refill_rounds: int = 2
    clip_low: float = 0.2
    clip_high: float = 0.28
    dual_clip: float | None = None
    aggregation: str = "token-mean"
    kl_coef: float = 0.0
    kl_type: str = "k3"
    entropy_coef: float = 0.0
    logprob_impl: str = "auto"  # cir.kernels.linear_logprob impl: auto | triton | torch | reference
    loss_impl: str = "auto"  # cir.kernels.policy_loss impl


@dataclass
class OptimConfig:
    lr: float = 1e-6
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 1.0
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # constant | cosine | linear
    min_lr_ratio: float = 0.0
    ppo_epochs: int = 1
    mini_batches: int = 1  # optimizer steps per RL step (per epoch)
    micro_batch_tokens: int = 16384  # padded tokens per forward/backward


@dataclass
class RunConfig:
    steps: int = 200
    seed: int = 0
    out_dir: str = "runs/cir"
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # torch CPU threads (0: torch's default)
    engine: str = "hf"
    engine_max_batch: int = 256
    rollout_mode: str = "async"  # async | turn_sync
    save_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    eval_every: int = 0  # 0: only before and after training
    eval_samples: int = 1
    eval_temperature: float = 0.0
    eval_at_start: bool = True
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "cir"
    progress: bool = True
    plot: bool = True


@dataclass
class DemoConfig:
    """The built-in demo task: arithmetic that is hard in the head and easy with code."""

    train_problems: int = 4000
    eval_problems: int = 200
    easy_share: float = 0.25  # single-digit sums: the tool does not help there
    warmup_steps: int = 2000  # supervised warm start on mixed traces
    warmup_batch: int = 64
    warmup_lr: float = 3e-3
    warmup_tool_share_hard: float = 0.4  # share of warm-start traces that use the interpreter
    warmup_tool_share_easy: float = 0.4
    # Small and many steps beats larger and fewer on 2 cores: a 2-layer, 64-wide model learns
    # to copy the expression into code within ~600 steps, but copying the interpreter's output
    # into the answer reliably takes ~2000 (with 1000, RL ends at ~80% held-out accuracy, the
    # misses being digits miscopied from the output; with 2000, ~98%).
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    # Progressive interaction budget: stages like {step: 0, tool_budget: 1, max_response_tokens: 2048}.
    # Empty: rollout.tool_budget and rollout.max_response_tokens for the whole run.
    schedule: list[dict] = field(default_factory=list)
    run: RunConfig = field(default_factory=RunConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)


PRESETS = ("demo", "paper")


def preset_path(name: str) -> Path:
    return Path(str(resources.files("cir") / "configs" / f"{name}.yaml"))


def load_train_config(config: str | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """`config`: None (the demo preset), a preset name, or a YAML path."""
    if config is None:
        config = "demo"
    path = preset_path(config) if config in PRESETS else Path(config)
    if not path.is_file():
        raise ConfigError(f"config {config!r}: no such file (presets: {', '.join(PRESETS)})")
    return load(TrainConfig, path, overrides)


__all__ = [
    "AlgoConfig", "ConfigError", "DataConfig", "DemoConfig", "ModelConfig", "OptimConfig", "RunConfig",
    "SandboxConfig", "TrainConfig", "dump_yaml", "load_train_config", "preset_path",
]
