"""The bundled configs (cir/configs) load and validate, the GPU recipes' launch commands agree with
their batch, and the scaling estimator's arithmetic holds by hand (`cir bench estimate`)."""

import math
import re
import shlex
from importlib import resources
from pathlib import Path

import pytest

from cir.bench.estimate import (
    GPU,
    RECIPES,
    Assumptions,
    ModelShape,
    estimate,
    estimate_run,
    model_shape,
    scaling_doc_table,
)
from cir.cli import main
from cir.training.config import PRESETS, load_train_config
from cir.training.trainer import check_run_inputs

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = sorted(p.name for p in (resources.files("cir") / "configs").iterdir() if p.name.endswith(".yaml"))


def launch_commands(text: str) -> list[list[str]]:
    """The `torchrun ...` commands written in a recipe's header comments, as argument lists."""
    commands = []
    for line in text.splitlines():
        body = line.lstrip("# ").strip()
        if line.startswith("#") and "torchrun " in body and "-m cir train" in body:
            words = shlex.split(body)
            commands.append(words[words.index("torchrun") :])
    return commands


def flag(words: list[str], name: str, default: str | None = None) -> str | None:
    for i, word in enumerate(words):
        if word.startswith(name + "="):
            return word.split("=", 1)[1]
        if word == name:
            return words[i + 1]
    return default


@pytest.mark.parametrize("filename", BUNDLED)
def test_bundled_config_loads_and_validates(filename):
    """Every YAML in cir/configs loads with the real loader (keys, types, choices, each section's
    own checks), is reachable by name as a preset, and passes the trainer's cheap input checks."""
    name = filename.removesuffix(".yaml")
    assert name in PRESETS, f"{filename}: not offered as a preset"
    try:
        cfg = load_train_config(name)
        check_run_inputs(cfg)
    except Exception as e:  # the file's name first, whatever failed
        pytest.fail(f"cir/configs/{filename}: {type(e).__name__}: {e}")
    assert cfg.run.steps > 0, f"{filename}: run.steps"


def test_recipes_are_bundled():
    assert {f"{name}.yaml" for name in RECIPES} <= set(BUNDLED)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_launch_command_matches_its_batch(name):
    """A recipe's header holds its launch command; the command names the recipe itself, and the
    world it starts splits the step's prompts evenly, with vLLM generating on every rank."""
    text = (resources.files("cir") / "configs" / f"{name}.yaml").read_text()
    commands = launch_commands(text)
    assert commands, f"{name}.yaml: no `torchrun ... -m cir train` command in its header"
    cfg = load_train_config(name)
    shape = model_shape(cfg.model.path)
    for words in commands:
        assert flag(words, "--config") == name, f"{name}.yaml: its command loads {flag(words, '--config')!r}"
        nodes = int(flag(words, "--nnodes", "1"))
        world = nodes * int(flag(words, "--nproc_per_node"))
        if nodes > 1:
            assert flag(words, "--rdzv-backend") == "c10d" and flag(words, "--rdzv-id"), f"{name}.yaml: rendezvous"
            assert re.fullmatch(r"\S+:\d+", flag(words, "--rdzv-endpoint")), f"{name}.yaml: --rdzv-endpoint HOST:PORT"
        else:
            assert "--standalone" in words, f"{name}.yaml: a one-node command uses --standalone"
        assert cfg.algo.prompts_per_step % world == 0, f"{name}.yaml: {cfg.algo.prompts_per_step} prompts / {world}"
        per_rank = cfg.algo.prompts_per_step // world * cfg.algo.group_size
        assert cfg.run.engine_max_batch >= per_rank, f"{name}.yaml: engine_max_batch < {per_rank} trajectories"
    assert cfg.run.engine == "vllm" and cfg.model.dtype == "float32" and cfg.model.gradient_checkpointing
    # One micro-batch holds at least one whole trajectory (the model's full context).
    assert cfg.optim.micro_batch_tokens >= shape.max_position_embeddings, f"{name}.yaml: micro_batch_tokens"


def test_estimate_arithmetic_by_hand():
    """A toy model whose every term is worked out by hand (see the comments)."""
    # H 8, I 16, 2 layers, 2 heads (head_dim 4), 1 KV head (kv_dim 4), vocab 32, untied, context 64.
    shape = ModelShape(8, 16, 2, 2, 1, 32, False, 64)
    # Layer: q, o 2 x 8 x 8 = 128; k, v 2 x 8 x 4 = 64; biases 8 + 4 + 4 = 16; MLP 3 x 8 x 16 = 384;
    # norms 2 x 8 = 16: 608. Root: embeddings and LM head 2 x 32 x 8 = 512, final norm 8: 520.
    assert (shape.layer_params, shape.root_params, shape.params) == (608, 520, 2 * 608 + 520)
    p = 1736
    gpu = GPU("toy", memory_gib=1, hbm_tb_per_s=1e-6, bf16_tflops=1e-9)  # 1e6 B/s, 1000 FLOP/s
    a = Assumptions(
        prompt_tokens=4,
        mean_response_tokens=10,
        decode_tokens_per_s=100,
        hbm_efficiency=0.5,
        mfu=0.5,
        engine_overhead_gib=0,
        engine_asleep_gib=0,
        reserve_gib=0,
    )
    est = estimate(
        shape,
        gpus=4,
        gpu=gpu,
        prompts_per_step=8,
        group_size=2,
        max_response_tokens=20,
        micro_batch_tokens=16,
        gradient_checkpointing=True,
        param_dtype="float32",
        engine_dtype="float32",
        engine_memory_fraction=0.5,
        mini_batches=2,
        sync_bucket_bytes=1024,  # the trainer's 256 MiB would not fit this 1 GiB toy GPU
        assumptions=a,
    )
    # Sharded fp32 master weights + AdamW's two moments: 12 x P / N bytes; gradients 4 x P / N.
    assert est.master_weights + est.optimizer_states == 12 * p / 4
    assert est.gradients == 4 * p / 4
    # bf16 gathered: root + 2 layers; unsharded grads (bf16 + fp32) x (root + 1 layer).
    assert est.gathered_params == 2 * (520 + 2 * 608)
    assert est.unsharded_grads == 6 * (520 + 608)
    # Per token and layer (12 H + 4 I) x 2 bytes = 320; final hidden + gathered rows 2 x 16 x 8 x 2 = 512.
    assert est.activations_with_checkpointing == 16 * (2 * 8 * 2 + 320) + 512
    assert est.activations_without_checkpointing == 16 * 2 * 320 + 512
    assert est.activations == est.activations_with_checkpointing
    assert est.logits_avoided == 2 * 16 * 32 * 4
    # Engine: half of 1 GiB; fp32 weights 4 x P; KV 2 x 2 layers x 1 head x 4 x 4 bytes = 64 per token.
    assert est.engine == 2**29 and est.engine_weights == 4 * p
    assert est.kv_tokens == (2**29 - 4 * p) // 64
    assert est.rollout_peak == 16 * p / 4 + 2**29
    # Update: resident + gathered + unsharded grads + activations (nothing asleep, no reserve here).
    # The cache is emptied before the engine wakes: it comes back beside the resident state only,
    # then takes the weights: two buckets of 1024 bytes + the largest tensor (the 32 x 8 embedding,
    # fp32). The policy is on the CPU when the engine starts, so the whole GPU is free then.
    update = 16 * p / 4 + 2 * (520 + 2 * 608) + 6 * (520 + 608) + 16 * (2 * 8 * 2 + 320) + 512
    assert est.update_peak == update and est.weight_sync == 2 * (1024 + 4 * 32 * 8)
    assert est.wake_peak == 16 * p / 4 + 2**29 + est.weight_sync == est.rollout_peak + est.weight_sync
    assert est.free_at_engine_start == 2**30 and est.fits
    # Time: 2 prompts x 2 samples per rank x 10 tokens at 100 x 2 / 4 (fp32 engine) tokens/s = 0.8 s,
    # longer than the longest response's 20 steps x 4P / (1e6 x 0.5) s.
    assert est.trajectories_per_rank == 4 and est.generated_tokens == 160
    assert est.decode_step_s == pytest.approx(4 * p / 5e5)
    assert est.generation_s == pytest.approx(0.8)
    # Update: (6 + 2 recompute + 2 old log-probs, as mini_batches > 1) x P x 16 x (4 + 10) tokens,
    # over 4 GPUs x 1000 FLOP/s x 0.5.
    assert est.train_flops == 10 * p * 16 * 14
    assert est.update_s == pytest.approx(10 * p * 16 * 14 / 2000)
    assert est.step_s == pytest.approx(est.generation_s + est.update_s)


def test_estimate_uses_the_trainers_sync_bucket():
    """The weight-sync term uses the bucket size the trainer's sync_weights uses."""
    from cir.bench.estimate import SYNC_BUCKET_BYTES
    from cir.training.actor import DEFAULT_BUCKET_BYTES

    assert SYNC_BUCKET_BYTES == DEFAULT_BUCKET_BYTES


def test_known_model_shapes():
    # Qwen2.5-1.5B's published parameter count (tied embeddings) follows from its config.
    assert model_shape("Qwen/Qwen2.5-Math-1.5B").params == 1_543_714_304
    assert math.isclose(model_shape("Qwen/Qwen2.5-Math-7B").params, 7.62e9, rel_tol=1e-3)
    with pytest.raises(ValueError, match="no local config.json"):
        model_shape("org/unknown-model")


# The GPUs each recipe is written for: (ranks, GPU kind).
RECIPE_GPUS = {
    "qwen2.5-math-7b-8gpu": (8, "h100"),
    "qwen2.5-math-7b-4x8gpu": (32, "h100"),
    "qwen2.5-math-1.5b-8gpu": (8, "h100"),
}


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_fits_its_gpus_as_configured(name):
    """The estimator reads the engine's dtype and memory share from the recipe, and by its
    estimate the recipe fits: vLLM starts, its KV cache holds all of a rank's trajectories in
    flight, and rollout, update and the engine's wake-up as the new weights arrive stay within the GPU."""
    cfg = load_train_config(name)
    gpus, gpu = RECIPE_GPUS[name]
    est = estimate_run(cfg, gpus, gpu)
    assert cfg.run.engine_dtype == "auto" and est.engine_dtype == "bfloat16"
    assert est.engine_memory_fraction == cfg.run.engine_memory_fraction
    assert est.engine_weights == 2 * est.params
    assert est.engine_starts and est.kv_tokens >= est.kv_tokens_needed, est.notes
    assert max(est.rollout_peak, est.update_peak, est.wake_peak) <= est.gpu_memory and est.fits, est.notes
    assert not any("refuses" in n or "wakes" in n or "preempts" in n for n in est.notes), est.notes


def test_estimate_overrides_and_what_does_not_fit():
    """The estimator's overrides replace the recipe's engine settings, and it sees a share that
    does not fit: with the cache emptied before the engine wakes, half an H100 for the 7B engine
    fits (the update's transient memory is no longer counted beside it), but 0.77 does not: its
    rollout fits, yet the woken engine plus the weight-sync buckets exceed the GPU. An fp32 engine
    doubles the weights and halves the decode rate."""
    cfg = load_train_config("qwen2.5-math-7b-8gpu")
    recipe = estimate_run(cfg, 8, "h100")
    half = estimate_run(cfg, 8, "h100", engine_memory_fraction=0.5)
    assert half.engine == 0.5 * half.gpu_memory and half.fits, half.notes
    # Waking beside the update's cached memory (the model before empty_cache) would not have fitted.
    assert half.update_peak - 2**30 + half.engine > half.gpu_memory > half.wake_peak
    tight = estimate_run(cfg, 8, "h100", engine_memory_fraction=0.77)
    assert tight.engine_starts and tight.rollout_peak <= tight.gpu_memory < tight.wake_peak and not tight.fits
    assert tight.wake_peak == pytest.approx(tight.rollout_peak + tight.weight_sync)
    assert tight.update_peak == recipe.update_peak < tight.gpu_memory  # the engine asleep: not the cause
    assert any("wakes" in n for n in tight.notes) and not any("wakes" in n for n in half.notes)
    fp32 = estimate_run(cfg, 8, "h100", engine_dtype="float32")
    assert fp32.engine_weights == 2 * recipe.engine_weights and fp32.kv_tokens < recipe.kv_tokens
    assert fp32.decode_tokens_per_s == recipe.decode_tokens_per_s / 2
    # vLLM refuses a share larger than what is free at its start (GPU - reserve).
    greedy = estimate_run(cfg, 8, "h100", engine_memory_fraction=0.99)
    assert not greedy.engine_starts and any("refuses to start" in n for n in greedy.notes)
    # Four times the ranks: a quarter of the sharded state, but the longest response bounds generation.
    multi = estimate_run(cfg, 32, "h100")
    assert multi.actor_resident == pytest.approx(recipe.actor_resident / 4)
    assert recipe.generation_s / multi.generation_s < 4


def test_scaling_doc_shows_the_estimators_table():
    doc = (ROOT / "docs" / "scaling.md").read_text()
    assert scaling_doc_table() in doc, "docs/scaling.md: paste the output of cir.bench.estimate.scaling_doc_table()"


def test_cli_bench_estimate(capsys):
    assert main(["bench", "estimate", "--config", "qwen2.5-math-1.5b-8gpu", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "estimates, not measurements" in out and re.search(r"^fits\s+yes", out, re.M)
    assert "engine in bfloat16 with 0.45 of the GPU" in out  # the recipe's run.engine_* settings
    # The flags override the recipe.
    args = ["bench", "estimate", "--config", "qwen2.5-math-7b-8gpu", "--gpus", "8"]
    assert main([*args, "--engine-memory-fraction", "0.77", "--engine-dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "engine in float32 with 0.77 of the GPU" in out and re.search(r"^fits\s+NO", out, re.M)
    # A config that does not exist: one line naming it, exit code 2.
    assert main(["bench", "estimate", "--config", "nope", "--gpus", "8"]) == 2
    assert "nope" in capsys.readouterr().err
