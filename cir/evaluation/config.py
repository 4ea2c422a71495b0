"""`cir eval`'s settings: `EvalConfig`, one typed section read by `cir.config_loader` like the
run's config, from a YAML file (`cir eval --config FILE`) and the command's flags (given flags
win over the file). A flag is its field's name with dashes: `--max-response-tokens 2048` is
`max_response_tokens: 2048` in the file. Errors name a setting by its flag.

Benchmarks are run as in the paper unless `samples` / `temperature` say otherwise
(`PAPER_PROTOCOL`: MATH500 greedy, the others 16 samples at temperature 1).

Like the run's config, this module imports neither torch nor transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cir.config_loader import ConfigError
from cir.engines.factory import DEFAULT_ENGINE, EngineDtype, engine_names

# The paper's protocol: MATH500 greedy, the others mean over 16 samples at temperature 1.
PAPER_PROTOCOL: dict[str, tuple[int, float]] = {
    "math500": (1, 0.0),
    "aime24": (16, 1.0),
    "aime25": (16, 1.0),
    "amc23": (16, 1.0),
    "olymmath-en-easy": (16, 1.0),
    "olymmath-en-hard": (16, 1.0),
}


def flag(name: str) -> str:
    """The command-line flag of the setting `name` (`max_response_tokens`: `--max-response-tokens`)."""
    return "--" + name.replace("_", "-")


@dataclass
class EvalConfig:
    """What `cir eval` evaluates and how; each field is also a flag (see the module docstring)."""

    model: str | None = None  # a Hugging Face model folder or a cir checkpoint (…/checkpoints/step_N); required
    tokenizer: str | None = None  # default: the model's
    # Benchmark short names (cir/benchmarks), .jsonl/.json/.parquet paths or Hugging Face datasets.
    benchmarks: list[str] = field(default_factory=lambda: list(PAPER_PROTOCOL))
    benchmark_dir: str | None = (
        None  # where short names are looked up (default: $CIR_BENCHMARK_DIR, else the package's)
    )
    samples: int | None = None  # per problem (default: the paper's protocol per benchmark)
    temperature: float | None = None  # sampling temperature (default: the paper's protocol)
    limit: int | None = None  # at most this many problems per benchmark (default: all)
    prompt: str = "cir"  # a prompt template name (cir: plain text; cir-chat: the chat template)
    tool_budget: int = 4  # executions per sample
    max_response_tokens: int = 4096
    grade_tool_output: bool = False  # grade the interpreter's output too (default: the model's own text)
    workers: int | None = None  # sandbox workers (default, or 0: the CPU count)
    engine: str = DEFAULT_ENGINE  # a registered engine (cir.engines.engine_names(): hf, vllm)
    device: str = "auto"  # auto: cuda when available, else cpu
    dtype: EngineDtype = "auto"  # the engine's copy: auto is bfloat16 on a GPU, float32 elsewhere
    max_batch: int = 64  # the engine decodes at most this many sequences together
    seed: int = 0
    out: str | None = None  # folder for the samples, results.json and the report (none: print only)

    def __post_init__(self) -> None:
        if not self.benchmarks:
            raise ConfigError(f"{flag('benchmarks')}: no benchmark named")
        for name, least in (("tool_budget", 0), ("max_response_tokens", 1), ("max_batch", 1)):
            if getattr(self, name) < least:
                raise ConfigError(f"{flag(name)} {getattr(self, name)}: must be >= {least}")
        if self.samples is not None and self.samples < 1:
            raise ConfigError(f"{flag('samples')} {self.samples}: must be >= 1")
        if self.temperature is not None and self.temperature < 0:
            raise ConfigError(f"{flag('temperature')} {self.temperature}: must be >= 0")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"{flag('limit')} {self.limit}: must be >= 1 (leave it out to evaluate every problem)")
        if self.workers is not None and self.workers < 0:
            raise ConfigError(f"{flag('workers')} {self.workers}: must be >= 0 (0: the CPU count)")
        if self.engine not in engine_names():
            raise ConfigError(f"{flag('engine')} {self.engine}: choose one of {', '.join(engine_names())}")

    def protocol(self, benchmark: str) -> tuple[int, float]:
        """(samples, temperature) for `benchmark`: the paper's protocol, unless set here."""
        samples, temperature = PAPER_PROTOCOL.get(benchmark_stem(benchmark), (1, 0.0))
        return (
            self.samples if self.samples is not None else samples,
            self.temperature if self.temperature is not None else temperature,
        )


def benchmark_stem(name: str) -> str:
    """A benchmark's name in file names and the paper's protocol: a file's stem, else the name
    with "/" replaced."""
    return Path(name).stem if name.lower().endswith((".jsonl", ".json", ".parquet")) else name.replace("/", "__")
