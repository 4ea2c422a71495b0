"""The training run's configuration: `TrainConfig`, composed of each section's dataclass.

Each section lives beside the code it configures (`model` in `cir.models`, `data` in
`cir.data`, `rollout` in `cir.rollout`, `sandbox` in `cir.sandbox`, `reward` in `cir.rewards`,
`algo` in `cir.algorithms`, `optim` and `sharding` in `cir.training.optim`); `run`, the loop
around the steps, is defined here. A task adds its own section with `register_section` (the
demo task: `demo`). `cir.config_loader` reads YAML and ``key=value`` overrides into it and
checks every key, type and choice at load time. Loading imports neither torch nor transformers
(nor does any section's module), so `cir train --print-config` and a config error answer at
once.

The defaults are the paper's recipe for a real run (REINFORCE++ with a group baseline,
clip 0.2/0.28, no KL, no entropy bonus, 16 samples per prompt, 128 prompts, lr 1e-6,
temperature 1.0, tool budget 2). ``cir train`` with no ``--config`` starts from the bundled
``demo`` preset instead (a tiny model on CPU); ``--config NAME`` names any YAML bundled in
``cir/configs`` (``paper``, and the GPU recipes such as ``qwen2.5-math-7b-8gpu``), so an
installed package needs no checkout; any other value is a YAML file:

    cir train --config paper model.path=Qwen/Qwen2.5-Math-7B data.train=/data/train.jsonl
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from cir.algorithms.config import AlgoConfig
from cir.algorithms.schedule import StageConfig
from cir.config_loader import SECTIONS, ConfigError, dump_yaml, load
from cir.data import DataConfig
from cir.engines.factory import DEFAULT_ENGINE, EngineDtype, engine_names, engine_refuses
from cir.models import ModelConfig, check_model_path, model_architecture
from cir.prompts import get_prompt
from cir.rewards.registry import RewardConfig
from cir.rollout.config import RolloutConfig
from cir.sandbox.config import SandboxConfig
from cir.training.optim import OptimConfig, ShardingConfig, actor_compute_dtype, attention_precision_problem


@dataclass
class RunConfig:
    """`run.*`: the loop around the steps (length, engine, evaluation, checkpoints, logging)."""

    steps: int = 200
    seed: int = 0
    out_dir: str = "runs/cir"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = 0  # torch CPU threads (0: torch's default)
    engine: str = DEFAULT_ENGINE  # a registered engine (cir.engines.engine_names(): hf, vllm)
    engine_max_batch: int = 256
    # The engine's copy of the policy: "auto" is bfloat16 on a GPU (the actor keeps model.dtype
    # master weights; the engine only samples) and the policy's own dtype on the CPU.
    engine_dtype: EngineDtype = "auto"
    # vLLM on a GPU: the share of the GPU's memory it takes for weights and KV cache; the rest is
    # the actor's (its shards, gradients, optimizer state, activations). See docs/scaling.md.
    engine_memory_fraction: float = 0.5
    rollout_mode: Literal["async", "turn_sync"] = "async"
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

    def __post_init__(self) -> None:
        for name in ("steps", "save_every", "eval_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)}: must be >= 0")
        if self.eval_samples < 1:
            raise ConfigError(f"eval_samples={self.eval_samples}: must be >= 1")
        if not 0 < self.engine_memory_fraction < 1:
            raise ConfigError(f"engine_memory_fraction={self.engine_memory_fraction}: must be in (0, 1)")
        if self.engine not in engine_names():
            raise ConfigError(f"engine={self.engine!r}: choose one of {', '.join(engine_names())}")


# Sections added by tasks (`register_section`): name -> dataclass.
_SECTIONS: dict[str, type] = {}


def register_section(name: str, section: type) -> None:
    """Add the top-level section `name` (a dataclass of settings) to the run's config, as a task
    does for its own settings: it is read, overridden (``name.field=value``), checked and printed
    like the built-in sections, and reaches the task's problem set and model builder as their
    `options` (see `cir.tasks`)."""
    taken = {f.name for f in fields(TrainConfig)} | set(_SECTIONS)
    if name in taken:
        raise ValueError(f"config section {name!r} already exists")
    _SECTIONS[name] = section


def _registered_sections() -> dict[str, Any]:
    return {name: section() for name, section in _SECTIONS.items()}


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    # Progressive interaction budget: stages like {step: 0, tool_budget: 1, max_response_tokens: 2048}.
    # Empty: rollout.tool_budget and rollout.max_response_tokens for the whole run.
    schedule: list[StageConfig] = field(default_factory=list)
    run: RunConfig = field(default_factory=RunConfig)
    # The sections tasks registered (`register_section`), by name; each is a top-level key in
    # YAML and overrides (`demo.num_heads=2`), like the sections above.
    sections: dict[str, Any] = field(default_factory=_registered_sections, metadata={SECTIONS: _SECTIONS})

    def __post_init__(self) -> None:
        # The hf engine copies the policy and builds its own sdpa/eager masks: refuse here what
        # it would refuse after the model is loaded.
        if self.model.attn_implementation == "flash_attention_2" and self.run.engine == "hf":
            raise ConfigError(
                "model.attn_implementation=flash_attention_2 with run.engine=hf: the hf engine supports sdpa and "
                "eager only; use run.engine=vllm"
            )
        # flash-attn: CUDA and bf16/fp16 compute only (run.device=auto: as on CUDA; the actor
        # checks again where it lands).
        device = "cuda" if self.run.device == "auto" else self.run.device
        compute = actor_compute_dtype(self.model.dtype, self.sharding, device)
        problem = attention_precision_problem(self.model.attn_implementation, compute, device)
        if problem is not None:
            raise ConfigError(problem)


def check_run_inputs(cfg: TrainConfig) -> None:
    """What the config's values alone do not show, checked in milliseconds on the machine the run
    is to use, before anything is built (`cir train` runs it before importing torch; the trainer
    runs it too; loading a config to print or estimate it does not): a run folder that is a
    file; an engine that cannot serve the model (not installed, or e.g. a head size vLLM's CPU
    backend does not take), as far as the model's architecture is known without loading it; the
    model and tokenizer paths; the prompt template. (The data is loaded, hence checked, next.)"""
    out_dir = Path(cfg.run.out_dir).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"run.out_dir={cfg.run.out_dir!r}: exists and is not a folder")
    architecture = model_architecture(cfg.model.path, cfg.sections.get(cfg.model.path))
    problem = engine_refuses(cfg.run.engine, architecture)
    if problem is not None:
        raise ConfigError(f"run.engine={cfg.run.engine!r} with model.path={cfg.model.path!r}: {problem}")
    check_model_path(cfg.model.path)
    if cfg.model.tokenizer is not None:
        check_model_path(cfg.model.tokenizer, key="model.tokenizer")
    try:
        get_prompt(cfg.data.prompt)
    except KeyError as e:
        raise ConfigError(f"data.prompt={cfg.data.prompt!r}: {e.args[0]}") from None


def _bundled_configs() -> tuple[str, ...]:
    folder = resources.files("cir") / "configs"
    return tuple(sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml")))


# The YAML files shipped in cir/configs, by name: the demo, the paper preset and the GPU recipes.
PRESETS = _bundled_configs()


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
    "PRESETS",
    "ConfigError",
    "RunConfig",
    "TrainConfig",
    "check_run_inputs",
    "dump_yaml",
    "load_train_config",
    "preset_path",
    "register_section",
]
