import json
import subprocess
import sys
import textwrap

import pytest

from cir.config_loader import ConfigError, dump_yaml, load, parse_override
from cir.training.config import TrainConfig, load_train_config, preset_path


def test_presets_load_and_differ():
    demo = load_train_config(None)
    paper = load_train_config("paper")
    assert demo.model.path == "demo" and demo.run.steps > 0
    # The paper's recipe.
    assert paper.algo.advantage == "reinforce_pp_baseline"
    assert (paper.algo.clip_low, paper.algo.clip_high) == (0.2, 0.28)
    assert paper.algo.group_size == 16 and paper.algo.prompts_per_step == 128
    assert paper.optim.lr == 1e-6 and paper.algo.kl_coef == 0.0 and paper.algo.entropy_coef == 0.0
    assert [s.tool_budget for s in paper.schedule] == [1, 2, 4]
    assert preset_path("demo").is_file()


def test_overrides_types_and_nesting(tmp_path):
    cfg = load_train_config(
        "paper",
        [
            "optim.lr=2e-6",
            "algo.group_size=8",
            "algo.dual_clip=3",
            "run.wandb=true",
            "data.eval=[aime24, math500]",
            "algo.dual_clip=null",
            "model.path=/models/x",
        ],
    )
    assert cfg.optim.lr == 2e-6 and isinstance(cfg.optim.lr, float)
    assert cfg.algo.group_size == 8
    assert cfg.algo.dual_clip is None
    assert cfg.run.wandb is True
    assert cfg.data.eval == ["aime24", "math500"]
    assert cfg.model.path == "/models/x"
    # A saved config loads back to the same thing.
    p = tmp_path / "run.yaml"
    p.write_text(dump_yaml(cfg))
    assert load(TrainConfig, p) == cfg


def test_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"algo\.group_sise"):
        load_train_config(None, ["algo.group_sise=4"])
    with pytest.raises(ConfigError, match=r"algo\.group_size: expected an integer"):
        load_train_config(None, ["algo.group_size=four"])
    with pytest.raises(ConfigError, match=r"run\.wandb: expected true/false"):
        load_train_config(None, ["run.wandb=maybe"])
    with pytest.raises(ConfigError, match="not of the form key=value"):
        parse_override("optim.lr")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_train_config(str(bad))
    with pytest.raises(ConfigError, match="no such file"):
        load_train_config(str(tmp_path / "missing.yaml"))
    # Section-level checks come from the sections' own validation (rollout).
    with pytest.raises((ConfigError, ValueError), match="on_budget_exhausted"):
        load_train_config(None, ["rollout.on_budget_exhausted=explode"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("algo.aggregation=token-meen", r"algo\.aggregation='token-meen': choose one of token-mean, "),
        ("algo.kl_type=k4", r"algo\.kl_type='k4': choose one of k1, k2, k3"),
        ("algo.advantage=ppo", r"algo\.advantage='ppo': choose one of .*reinforce_pp_baseline"),
        ("algo.loss_impl=cuda", r"algo\.loss_impl='cuda': choose one of auto, triton, torch, reference"),
        ("algo.kl_cap=0", r"algo\.kl_cap=0\.0: must be > 0"),
        ("algo.rollout_correction=tis", r"algo\.rollout_correction='tis': choose one of none, token_tis, seq_mis"),
        ("algo.rollout_correction_cap=1", r"algo\.rollout_correction_cap=1\.0: must be > 1"),
        ("run.engine=vllmm", r"run\.engine='vllmm': choose one of hf"),
        ("run.rollout_mode=sync", r"run\.rollout_mode='sync': choose one of async, turn_sync"),
        ("run.device=tpu", r"run\.device='tpu': choose one of auto, cpu, cuda"),
        ("model.dtype=fp8", r"model\.dtype='fp8': choose one of float32, bfloat16, float16"),
        ("optim.lr_schedule=step", r"optim\.lr_schedule='step': choose one of constant, cosine, linear"),
        ("optim.mini_batches=0", r"optim\.mini_batches=0: must be >= 1"),
        ("rollout.tool_budget=-1", r"rollout\.tool_budget must be >= 0"),
        ("schedule=[{step: 0, tool_budget: -2}]", r"schedule\[0\]\.tool_budget must be >= 0"),
        ("schedule=[{step: 0, budget: 2}]", r"schedule\[0\]\.budget"),
    ],
)
def test_choices_and_values_are_rejected_at_load_time_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_train_config(None, [override])


def test_each_value_has_one_default():
    """The sandbox section's defaults are the sandbox's own (one place for the preload list)."""
    from cir.sandbox import DEFAULT_PRELOAD, SandboxConfig

    cfg = load_train_config("paper")
    assert cfg.sandbox.preload == list(DEFAULT_PRELOAD) == SandboxConfig().preload
    assert cfg.algo.kl_cap == 10.0


def test_a_task_registers_its_parts_and_its_section_reads_and_prints_like_any_other(tmp_path):
    """What one task module does (here in a fresh process, to leave this one's registries alone):
    register a problem set, a prompt and a config section; the run then names them, overrides
    the section, gets the section back as the problem set's options and prints it as a
    top-level section."""
    code = textwrap.dedent(
        """
        import json
        from dataclasses import dataclass
        from cir.config_loader import ConfigError, dump_yaml
        from cir.data import Problem, register_problem_set
        from cir.prompts import PromptTemplate, register_prompt
        from cir.training.config import load_train_config, register_section
        from cir.training.trainer import load_run_problems

        @dataclass
        class ToyConfig:
            problems: int = 2

        def toy_problems(split, *, seed, options):
            return [Problem(id=f"{split}-{i}", problem=f"{i}+{seed}", answer=str(i + seed), source="toy")
                    for i in range(options.problems)]

        try:
            load_train_config(None, ["toy.problems=3"])
        except ConfigError as e:
            unknown = str(e)
        register_problem_set("toy", toy_problems)
        register_prompt(PromptTemplate("toy", system="", user_format="{problem}="))
        register_section("toy", ToyConfig)
        cfg = load_train_config(None, ["data.train=toy", "data.eval=[toy]", "data.prompt=toy", "toy.problems=3", "run.seed=5"])
        train, held_out = load_run_problems(cfg)
        print(json.dumps({
            "unknown": unknown,
            "section": cfg.sections["toy"].problems,
            "train": [p.answer for p in train],
            "held_out": {k: [p.id for p in v] for k, v in held_out.items()},
            "yaml": dump_yaml(cfg),
        }))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout)
    assert "unknown config key(s) toy" in found["unknown"]
    assert found["section"] == 3
    assert found["train"] == ["5", "6", "7"]
    assert found["held_out"] == {"toy": ["test-0", "test-1", "test-2"]}
    assert found["yaml"].endswith("toy:\n  problems: 3\n")
