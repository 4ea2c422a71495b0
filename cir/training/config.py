"""The training run's configuration: `TrainConfig`, composed of each section's dataclass.

Each section lives beside the code it configures (`model` in `cir.models`, `data` in
`cir.data`, `rollout` in `cir.rollout`, `sandbox` in `cir.sandbox`, `reward` in `cir.rewards`,
`algo` in `cir.algorithms`, `optim` and `sharding` in `cir.training.optim`, `run` in
`cir.training.trainer`, `demo` in `cir.tasks.demo`); `cir.config_loader` reads YAML and
``key=value`` overrides into it and checks every key, type and choice at load time.

The defaults are the paper's recipe for a real run (REINFORCE++ with a group baseline,
clip 0.2/0.28, no KL, no entropy bonus, 16 samples per prompt, 128 prompts, lr 1e-6,
temperature 1.0, tool budget 2). ``cir train`` with no ``--config`` starts from the bundled
``demo`` preset instead (a tiny model on CPU); ``--config NAME`` names any YAML bundled in
``cir/configs`` (``paper``, and the GPU recipes such as ``qwen2.5-math-7b-8gpu``), so an
installed package needs no checkout; any other value is a YAML file:

    cir train --config paper model.path=Qwen/Qwen2.5-Math-7B data.train=/data/train.jsonl
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from cir.algorithms import AlgoConfig, StageConfig
from cir.config_loader import ConfigError, dump_yaml, load
from cir.data import DataConfig
from cir.models import ModelConfig
from cir.rewards import RewardConfig
from cir.rollout import RolloutConfig
from cir.sandbox import SandboxConfig
from cir.tasks.demo import DemoConfig
from cir.training.optim import OptimConfig, ShardingConfig, actor_compute_dtype, attention_precision_problem
from cir.training.trainer import RunConfig


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
    demo: DemoConfig = field(default_factory=DemoConfig)

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


__all__ = ["ConfigError", "PRESETS", "TrainConfig", "dump_yaml", "load_train_config", "preset_path"]
