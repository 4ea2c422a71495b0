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
    gpu = GPU("toy", memory_bytes=2**30, hbm_tb_per_s=1e-6, matmul_tflops=1e-9)  # 1e6 B/s, 1000 FLOP/s
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
    # fp32), and vLLM reloads each layer through a copy of it: the largest vLLM layer is the
    # embedding or gate_up_proj (both 256 values; qkv_proj 8 x 16 = 128), in the fp32 engine.
    # The policy is on the CPU when the engine starts, so the whole GPU is free then.
    update = 16 * p / 4 + 2 * (520 + 2 * 608) + 6 * (520 + 608) + 16 * (2 * 8 * 2 + 320) + 512
    assert est.update_peak == est.update_allocated == update and est.weight_sync == 2 * (1024 + 4 * 32 * 8)
    assert est.reload_temporary == 4 * 256
    assert est.wake_peak == 16 * p / 4 + 2**29 + est.weight_sync + 1024
    assert est.wake_peak == est.rollout_peak + est.weight_sync + est.reload_temporary
    assert est.free_at_engine_start == 2**30 and est.fits
    # Time: 2 prompts x 2 samples per rank x 10 tokens at 100 x 2 / 4 (fp32 engine) tokens/s = 0.8 s,
    # longer than the longest response's 20 steps x 4P / (1e6 x 0.5) s.
    assert est.trajectories_per_rank == 4 and est.generated_tokens == 160
    assert est.decode_step_s == pytest.approx(4 * p / 5e5)
    assert est.generation_s == pytest.approx(0.8)
    # Update: one forward pass is 16 trajectories x 14 tokens through each layer's 576 matmul
    # weights (q, o 2 x 64; k, v 2 x 32; MLP 384), causal attention over 16 x (14 x 15 / 2) = 1680
    # (query, key) pairs at 4 x H FLOPs each, and the LM head (32 x 8) over the 16 x 10 response
    # tokens only: 2 x (2 x 576 x 224 + 4 x 8 x 1680) + 2 x 8 x 32 x 160 = 705,536 FLOPs.
    # Passes: forward 1, backward 2, recompute 1, old log-probs 1 (mini_batches > 1 is off-policy).
    one_pass = 2 * (2 * 576 * 224 + 4 * 8 * 1680) + 2 * 8 * 32 * 160
    assert shape.layer_matmul_params == 576 and one_pass == 705_536
    assert est.update_passes == {"old/ref log-probs": 1.0, "forward": 1.0, "backward": 3.0}
    assert est.train_flops == 5 * one_pass
    assert est.update_s == pytest.approx(5 * one_pass / 2000)  # over 4 GPUs x 1000 FLOP/s x 0.5
    assert est.step_s == pytest.approx(est.generation_s + est.update_s)


def test_estimate_uses_the_trainers_sync_bucket():
    """The weight-sync term uses the bucket size the trainer's sync_weights uses."""
    from cir.bench.estimate import SYNC_BUCKET_BYTES
    from cir.training.actor import DEFAULT_BUCKET_BYTES

    assert SYNC_BUCKET_BYTES == DEFAULT_BUCKET_BYTES


def test_gpu_memory_is_the_drivers_total_not_the_datasheets_gigabytes():
    """An "80 GB" H100 holds 81,559 MiB (79.6 GiB), not 80 GiB; vLLM's share is taken of that total
    (engine_start_bytes: ceil(total x fraction)), and the table prints it in GiB."""
    from cir.bench.estimate import GPUS
    from cir.engines.vllm import engine_start_bytes

    h100 = GPUS["h100"]
    assert h100.memory_bytes == 81559 * 2**20 and 79 * 2**30 < h100.memory_bytes < 80 * 2**30
    assert 140 * 2**30 < GPUS["h200"].memory_bytes < 141 * 2**30
    est = estimate_run(load_train_config("qwen2.5-math-7b-8gpu"), 8, "h100")
    assert est.gpu_memory == h100.memory_bytes
    assert est.engine == engine_start_bytes(h100.memory_bytes, 0.6) == math.ceil(0.6 * 81559 * 2**20)
    assert "79.6 GiB" in dict((q, v) for q, v, _ in est.rows())["GPU memory"]


def test_estimator_asks_the_owners():
    """The dtype sizes, the engine's "auto" dtype and the on-policy rule come from the modules that
    own them, so a change there changes the estimate."""

    from cir.bench.estimate import dtype_bytes, gpu_engine_dtype, update_passes
    from cir.engines.factory import engine_dtype
    from cir.models import DTYPES
    from cir.training.optim import OptimConfig

    assert {name: dtype_bytes(name) for name in DTYPES} == {"float32": 4, "bfloat16": 2, "float16": 2}
    with pytest.raises(ValueError, match="float8"):
        dtype_bytes("float8")
    assert gpu_engine_dtype("auto") == engine_dtype("auto", "cuda")
    assert gpu_engine_dtype("float32") == "float32"
    for epochs, minis in [(1, 1), (1, 2), (2, 1)]:
        on_policy = OptimConfig(ppo_epochs=epochs, mini_batches=minis).on_policy
        assert on_policy == (epochs == 1 and minis == 1)
        shape = ModelShape(8, 16, 2, 2, 1, 32, False, 64)
        est = estimate(shape, gpus=1, gpu=GPU("toy", 2**30, 1.0, 1.0), prompts_per_step=2, group_size=2,
                       max_response_tokens=8, micro_batch_tokens=64, gradient_checkpointing=False,
                       ppo_epochs=epochs, mini_batches=minis)  # fmt: skip
        want = update_passes(ppo_epochs=epochs, on_policy=on_policy, gradient_checkpointing=False, kl_reference=False)
        assert est.update_passes == want and (want["old/ref log-probs"] == 0) == on_policy


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
    assert tight.wake_peak == pytest.approx(tight.rollout_peak + tight.weight_sync + tight.reload_temporary)
    # vLLM's reload holds the largest layer twice: the 152,064 x 3,584 embedding in bf16, 1.0 GiB.
    assert tight.reload_temporary == 2 * 152064 * 3584
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


def test_one_rank_sharded_actor_is_estimated_like_fsdp():
    """One rank on a GPU is sharded as the actor builds it there (FSDP2 over a group of one, bf16
    compute): the gathered bf16 copy and the unsharded gradients count, as for several ranks; a
    plain module (sharded=False) computes in the parameters' dtype and gathers nothing."""
    shape = ModelShape(8, 16, 2, 2, 1, 32, False, 64)
    kw = dict(gpus=1, gpu=GPU("toy", 2**30, 1.0, 1.0), prompts_per_step=2, group_size=2, max_response_tokens=8,
              micro_batch_tokens=16, gradient_checkpointing=False)  # fmt: skip
    plain, sharded = estimate(shape, **kw, sharded=False), estimate(shape, **kw)
    assert plain.gathered_params == plain.unsharded_grads == 0
    assert sharded.gathered_params == 2 * (520 + 2 * 608) and sharded.unsharded_grads == 6 * (520 + 608)
    assert sharded.activations < plain.activations  # bf16 activations, not fp32
    assert (
        sharded.update_allocated
        == sharded.actor_resident + sharded.gathered_params + sharded.unsharded_grads + sharded.activations
    )
