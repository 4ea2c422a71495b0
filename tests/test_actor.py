"""The one actor class: sharded (FSDP2) or not, the same update; the hand-off batch left as built;
metrics accumulated and reduced in one place; the policy exported as a Hugging Face folder from a
stream of whole tensors; flash-attn refused where it cannot run.

Sharding over several ranks is tested under torchrun (test_fsdp_handoff.py, test_packing.py,
test_distributed_train.py); here the sharded path runs in this process over a group of one, as
one GPU runs it."""

import copy
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from cir.algorithms import AlgoConfig
from cir.config_loader import ConfigError
from cir.distributed import DistributedContext
from cir.models import tiny_causal_lm
from cir.tokenization import byte_tokenizer
from cir.training import export
from cir.training.actor import Actor, UpdateMetrics, micro_batch_loss
from cir.training.batch import build_train_batch
from cir.training.optim import OptimConfig, ShardingConfig, attention_precision_problem
from cir.training.sharding import compute_dtype, device_mesh, mixed_precision, should_shard
from cir.trajectory import Trajectory

VOCAB = 200


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def _model(tok, *, tied=False, dtype=torch.float32):
    return tiny_causal_lm(
        tok, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, tie_word_embeddings=tied, seed=0, dtype=dtype
    )


def _batch(tok, seed, *, mini_batches=2, device="cpu", temperature=1.0, packing=False):
    """10 random trajectories (feedback tokens in the longer ones), in micro-batches of <= 64 slots."""
    g = torch.Generator().manual_seed(seed)
    trajs = []
    for i in range(10):
        p, r = int(torch.randint(2, 9, (1,), generator=g)), int(torch.randint(1, 20, (1,), generator=g))
        t = Trajectory(prompt_ids=torch.randint(3, VOCAB, (p,), generator=g).tolist(), problem_id=str(i), group=i)
        tokens = torch.randint(3, VOCAB, (r,), generator=g).tolist()
        t.append(tokens[:2], None, trainable=True)
        t.append(tokens[2:4], None, trainable=False)
        t.append(tokens[4:], None, trainable=True)
        t.sampler_logprobs[:] = (-torch.rand(r, generator=g) * 6).tolist()
        trajs.append(t)
    return build_train_batch(
        trajs,
        torch.linspace(-1.0, 1.0, 10),
        pad_id=tok.pad_token_id,
        device=device,
        mini_batches=mini_batches,
        micro_batch_tokens=64,
        temperature=temperature,
        max_response_tokens=32,
        packing=packing,
    )


def _weights(actor):
    return {k: v.detach().clone() for bucket in actor.iter_weights() for k, v in bucket}


@pytest.fixture
def group_of_one():
    """A sharded actor in one process joins a process group of one; it must not outlive the test
    (a default group would change how later tests start vLLM)."""
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def test_sharded_in_one_process_updates_exports_and_resumes_as_the_plain_module(tok, tmp_path, group_of_one):
    """What one GPU runs (FSDP2 over a group of one), here on the CPU in fp32: the same metrics and
    weights as the plain module over two steps (two optimizer steps each, so old log-probs are
    computed; a KL term, so the reference is sharded too; tied embeddings). The export from the
    shards is the plain module's, and the sharded optimizer state resumes in an unsharded actor."""
    algo = AlgoConfig(kl_coef=0.05)
    optim = OptimConfig(lr=1e-2)
    plain = Actor(_model(tok, tied=True), tok, optim, algo, total_optimizer_steps=4)
    sharded = Actor(_model(tok, tied=True), tok, optim, algo, total_optimizer_steps=4, shard=True)
    assert not plain.sharded and sharded.sharded and torch.distributed.get_world_size() == 1
    assert type(next(sharded.policy.parameters())).__name__ == "DTensor"
    assert sharded.compute_dtype == plain.compute_dtype == torch.float32  # no mixed precision on the CPU
    for step in range(2):
        got, want = sharded.update(_batch(tok, step)), plain.update(_batch(tok, step))
        assert got.keys() == want.keys()
        for k in want:
            assert got[k] == pytest.approx(want[k], rel=1e-6, abs=1e-9), (step, k)
    assert want["actor/kl_loss"] > 0 and want["actor/grad_norm"] > 0
    w_plain, w_sharded = _weights(plain), _weights(sharded)
    assert w_plain.keys() == w_sharded.keys()
    for k in w_plain:
        torch.testing.assert_close(w_sharded[k], w_plain[k], rtol=0, atol=1e-6, msg=k)

    plain.save_pretrained(tmp_path / "plain")
    sharded.save_pretrained(tmp_path / "sharded")
    a, b = (load_file(str(tmp_path / run / "model.safetensors")) for run in ("plain", "sharded"))
    assert a.keys() == b.keys() and "lm_head.weight" not in a  # the tied head is stored once
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded")
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(loaded.model.embed_tokens.weight, w_sharded["model.embed_tokens.weight"])

    # The sharded optimizer state (DCP) continues in a plain actor exactly as in the sharded one.
    state = sharded.save_sharded_state(tmp_path / "optimizer")
    resumed = Actor(loaded, tok, optim, algo, total_optimizer_steps=4, reference=_model(tok, tied=True))
    resumed.load_sharded_state(tmp_path / "optimizer", state)
    got, want = resumed.update(_batch(tok, 2)), sharded.update(_batch(tok, 2))
    for k in ("actor/loss", "actor/kl_loss", "actor/grad_norm", "actor/lr"):
        assert got[k] == pytest.approx(want[k], rel=1e-5), k
    w_resumed, w_sharded = _weights(resumed), _weights(sharded)
    for k in w_sharded:
        torch.testing.assert_close(w_resumed[k], w_sharded[k], rtol=0, atol=1e-5, msg=k)


def test_the_update_leaves_the_hand_off_as_built(tok):
    """Old and reference log-probs are the actor's own: the micro-batches it is given are not
    changed (no field is filled in, no tensor written)."""
    batch = _batch(tok, 0)
    before = [
        {f.name: copy.deepcopy(getattr(mb, f.name)) for f in dataclasses.fields(mb)} for mb in batch.micro_batches
    ]
    actor = Actor(
        _model(tok), tok, OptimConfig(lr=1e-2, ppo_epochs=2), AlgoConfig(kl_coef=0.05), total_optimizer_steps=4
    )
    metrics = actor.update(batch)
    assert metrics["actor/kl_loss"] > 0 and metrics["actor/ratio_max"] > 1  # both fixed log-probs were used
    for mb, fields in zip(batch.micro_batches, before):
        for name, value in fields.items():
            now = getattr(mb, name)
            same = torch.equal(now, value) if isinstance(value, torch.Tensor) else now == value
            assert same, name
    assert not any("logprobs" in f.name and f.name != "sampler_logprobs" for f in dataclasses.fields(type(mb)))


# The LM head and the loss in one pass against linear_logprob then the loss: (optim, algo, tied,
# temperature, packed micro-batches). On-policy with an entropy bonus; off-policy (2 epochs x 2
# mini-batches: old log-probs) with a capped k3 KL, the token-level rollout correction and a
# sequence-mean aggregation; the sequence-level correction with the length-normalised sum.
FUSED_CASES = {
    "on-policy+entropy": (OptimConfig(lr=1e-2), AlgoConfig(entropy_coef=0.01), False, 0.7, False),
    "off-policy+kl+token_tis": (
        OptimConfig(lr=1e-2, ppo_epochs=2, mini_batches=2),
        AlgoConfig(kl_coef=0.05, kl_type="k3", rollout_correction="token_tis", aggregation="seq-mean-token-mean"),
        True,
        1.0,
        True,
    ),
    "off-policy+seq_mis+entropy": (
        OptimConfig(lr=1e-2, ppo_epochs=2),
        AlgoConfig(
            rollout_correction="seq_mis", aggregation="seq-mean-token-sum-norm", entropy_coef=0.02, kl_coef=0.02
        ),
        False,
        1.3,
        False,
    ),
}


@pytest.mark.parametrize("case", list(FUSED_CASES))
def test_the_fused_lm_head_and_loss_update_as_the_composition(tok, case):
    """Two updates of a float64 tiny model through each path: the same metrics (rel 1e-9) and
    the same weights (1e-10 absolute; Adam's steps are ~1e-2, so rounding, not a wrong term, could
    only differ there). `auto` takes the fused path on a CPU where it applies."""
    optim, algo, tied, temperature, packing = FUSED_CASES[case]
    actors = {
        path: Actor(
            _model(tok, tied=tied, dtype=torch.float64),
            tok,
            optim,
            dataclasses.replace(algo, fused_loss=path),
            total_optimizer_steps=4,
        )
        for path in ("never", "auto")
    }
    assert not actors["never"].fused_loss and actors["auto"].fused_loss
    for step in range(2):
        mini = optim.mini_batches
        want, got = (
            a.update(_batch(tok, step, mini_batches=mini, temperature=temperature, packing=packing))
            for a in (actors["never"], actors["auto"])
        )
        assert got.keys() == want.keys()
        for k in want:
            assert got[k] == pytest.approx(want[k], rel=1e-9, abs=1e-12), (step, k)
    assert want["actor/grad_norm"] > 0 and want["actor/entropy"] > 0
    if algo.kl_coef:
        assert want["actor/kl_loss"] != 0
    w_want, w_got = _weights(actors["never"]), _weights(actors["auto"])
    moved = max((w_want[k] - p).abs().max().item() for k, p in _weights_of(_model(tok, tied=tied)).items())
    assert moved > 1e-3  # the updates did change the weights
    for k in w_want:
        assert torch.isfinite(w_got[k]).all(), k
        torch.testing.assert_close(w_got[k], w_want[k], rtol=0, atol=1e-10, msg=k)


def _weights_of(model):
    return {k: v.detach().double() for k, v in model.state_dict().items()}


def test_where_the_fused_lm_head_and_loss_apply(tok):
    """auto: on this CPU wherever the loss can be taken a token at a time; not with an on-policy
    rollout correction (its weights need the pass's own log-probs first) nor when a kernel is
    forced to its plain reference; always: an error where it cannot apply; never: the default."""

    def fused(optim, **algo):
        algo = {"fused_loss": "auto", **algo}
        return Actor(_model(tok), tok, optim, AlgoConfig(**algo), total_optimizer_steps=1).fused_loss

    on, off = OptimConfig(), OptimConfig(ppo_epochs=2)
    assert fused(on) and fused(off, rollout_correction="token_tis") and fused(on, logprob_impl="torch")
    assert not fused(on, rollout_correction="seq_mis") and not fused(on, fused_loss="never")
    assert not fused(on, loss_impl="reference") and not fused(on, logprob_impl="reference")
    assert (
        AlgoConfig().fused_loss == "never"
        and not Actor(_model(tok), tok, on, AlgoConfig(), total_optimizer_steps=1).fused_loss
    )
    with pytest.raises(ConfigError, match="rollout_correction"):
        fused(on, rollout_correction="token_tis", fused_loss="always")
    with pytest.raises(ConfigError, match="logprob_impl"):
        AlgoConfig(fused_loss="always", logprob_impl="reference")


def test_the_placeholder_pass_runs_fused_off_policy_with_a_rollout_correction(tok):
    """A rank with fewer micro-batches runs the placeholder: off-policy with a rollout correction
    the fused pass needs its old log-probs before it runs, which the actor hands it (zeros)."""
    algo = AlgoConfig(kl_coef=0.05, rollout_correction="token_tis", fused_loss="auto")
    actor = Actor(_model(tok), tok, OptimConfig(ppo_epochs=2), algo, total_optimizer_steps=2)
    assert actor.fused_loss
    _, fixed = actor._fixed_logprobs(_batch(tok, 0), on_policy=False)
    loss, metrics = micro_batch_loss(
        actor.policy, actor.placeholder, algo, fixed, temperature=1.0, max_response_tokens=8, fused=True
    )
    (loss * 0.0).backward()
    assert torch.isfinite(loss) and all(torch.isfinite(torch.as_tensor(v)) for v in metrics.values())


def test_update_metrics_are_token_weighted_means_and_maxima():
    acc = UpdateMetrics()
    acc.add({"actor/loss": torch.tensor(1.0), "actor/ratio_max": 3.0}, weight=2)
    acc.add({"actor/loss": 4.0, "actor/ratio_max": 1.5}, weight=1)
    acc.expect(["actor/loss", "actor/kl_loss", "actor/other_max"])  # keys a placeholder pass brings
    assert acc.reduce(DistributedContext()) == {
        "actor/kl_loss": 0.0,
        "actor/loss": (2 * 1.0 + 4.0) / 3,
        "actor/other_max": 0.0,
        "actor/ratio_max": 3.0,
    }
    empty = UpdateMetrics()  # a rank with no micro-batch: every key at weight 0, no division by 0
    empty.expect(["actor/loss"])
    assert empty.reduce(DistributedContext()) == {"actor/loss": 0.0}


def test_when_and_how_the_actor_is_sharded(tok):
    assert should_shard(2, "cpu") and should_shard(1, "cuda") and should_shard(8, "cuda")
    assert not should_shard(1, "cpu")
    # CUDA: bf16 compute, fp32 gradient reduction; the parameters (master weights) keep their dtype.
    mp = mixed_precision(ShardingConfig(), "cuda")
    assert (mp.param_dtype, mp.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert mixed_precision(ShardingConfig(compute_dtype="float32"), "cuda").param_dtype is None
    assert mixed_precision(ShardingConfig(), "cpu").param_dtype is None
    model = _model(tok)
    assert compute_dtype(model, ShardingConfig(), "cuda", sharded=True) == torch.bfloat16
    assert compute_dtype(model, ShardingConfig(compute_dtype="float32"), "cuda", sharded=True) == torch.float32
    assert compute_dtype(model, ShardingConfig(), "cpu", sharded=True) == torch.float32
    assert compute_dtype(model, ShardingConfig(), "cuda", sharded=False) == torch.float32
    with pytest.raises(ValueError, match="2 ranks train one sharded model"):
        Actor(
            model, tok, OptimConfig(), AlgoConfig(), total_optimizer_steps=1, dist=DistributedContext(0, 2), shard=False
        )
    assert not torch.distributed.is_initialized()
    with pytest.raises(ConfigError, match=r"sharding\.replicate=2 does not divide the number of ranks \(3\)"):
        device_mesh(ShardingConfig(replicate=2), 3, "cpu")
    assert not torch.distributed.is_initialized()  # refused before any group was made


def test_sharding_is_a_checked_config_section():
    from cir.training.config import load_train_config

    cfg = load_train_config(None, ["sharding.replicate=4", "sharding.compute_dtype=float32"])
    assert (cfg.sharding.replicate, cfg.sharding.compute_dtype) == (4, "float32")
    assert load_train_config(None).sharding == ShardingConfig()
    with pytest.raises(ConfigError, match=r"sharding\.replicate=0: must be >= 1"):
        load_train_config(None, ["sharding.replicate=0"])
    with pytest.raises(ConfigError, match=r"sharding\.compute_dtype"):
        load_train_config(None, ["sharding.compute_dtype=float16"])


def test_flash_attention_is_refused_where_it_cannot_run(tok):
    """flash-attn runs on CUDA in bf16/fp16 only. On CUDA the actor computes in bf16 by default
    (FSDP2's mixed precision, one GPU or many), so the fp32 default model.dtype is fine there;
    what cannot run is refused when the config is loaded, or when the actor is built where the
    device was left to `auto`, before any forward."""
    from cir.training.config import load_train_config

    flash = ["model.attn_implementation=flash_attention_2", "run.engine=vllm", "model.dtype=float32"]
    for ok in (
        ["run.device=cuda"],  # bf16 compute, fp32 master weights
        ["run.device=auto"],
        ["run.device=cuda", "sharding.compute_dtype=float32", "model.dtype=bfloat16"],
    ):
        assert load_train_config("paper", [*flash, *ok]).model.attn_implementation == "flash_attention_2"
    with pytest.raises(ConfigError, match="runs on CUDA only, and the actor is on cpu"):
        load_train_config("paper", [*flash, "run.device=cpu"])
    with pytest.raises(ConfigError, match="needs bfloat16 or float16 compute, and the actor would compute in float32"):
        load_train_config("paper", [*flash, "run.device=cuda", "sharding.compute_dtype=float32"])
    assert attention_precision_problem("sdpa", "float32", "cpu") is None

    # `run.device=auto` on a machine without a GPU: the actor lands on the CPU and refuses.
    model = _model(tok)
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ConfigError, match="flash_attention_2 runs on CUDA only"):
        Actor(model, tok, OptimConfig(), AlgoConfig(), total_optimizer_steps=1)


@pytest.mark.parametrize("tied", [False, True])
def test_export_writes_what_transformers_save_pretrained_writes(tok, tmp_path, tied):
    model = _model(tok, tied=tied, dtype=torch.bfloat16)
    names = export.saved_names(model)
    assert ("lm_head.weight" in names) != tied and "model.embed_tokens.weight" in names
    export.save_pretrained(
        model, ((n, t) for n, t in model.state_dict().items() if n in names), tmp_path / "ours", names
    )
    model.save_pretrained(tmp_path / "hf")
    for name in ("config.json", "generation_config.json"):
        assert json.loads((tmp_path / "ours" / name).read_text()) == json.loads((tmp_path / "hf" / name).read_text())
    ours, theirs = (
        load_file(str(tmp_path / "ours" / "model.safetensors")),
        load_file(str(tmp_path / "hf" / "model.safetensors")),
    )
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert ours[k].dtype == torch.bfloat16 and torch.equal(ours[k], theirs[k]), k
    # A stream that does not match the names is an error, not a corrupt file.
    with pytest.raises(ValueError, match="never arrived"):
        export.save_pretrained(model, iter([]), tmp_path / "short", names)


@pytest.mark.gpu
def test_one_gpu_actor_computes_in_bf16_with_fp32_master_weights(tok, tmp_path, group_of_one):
    """One process on CUDA: FSDP2 over a group of one, bf16 compute, fp32 parameters; the update
    follows the fp32 CPU update to bf16 precision, and the export holds fp32 weights."""
    cpu = Actor(_model(tok), tok, OptimConfig(lr=1e-3), AlgoConfig(), total_optimizer_steps=1)
    gpu = Actor(_model(tok).cuda(), tok, OptimConfig(lr=1e-3), AlgoConfig(), total_optimizer_steps=1)
    assert gpu.sharded and gpu.compute_dtype == torch.bfloat16
    assert next(gpu.policy.parameters()).dtype == torch.float32
    want = cpu.update(_batch(tok, 0, mini_batches=1))
    got = gpu.update(_batch(tok, 0, mini_batches=1, device="cuda"))
    assert all(torch.isfinite(torch.tensor(v)) for v in got.values())
    for k in ("actor/loss", "actor/entropy", "actor/grad_norm"):
        assert got[k] == pytest.approx(want[k], rel=5e-2), k
    gpu.save_pretrained(tmp_path / "gpu")
    saved = load_file(str(tmp_path / "gpu" / "model.safetensors"))
    live = _weights(gpu)
    assert all(saved[k].dtype == torch.float32 and torch.equal(saved[k], live[k].cpu()) for k in saved)


def test_the_ratio_is_taken_against_the_sampler_when_the_batch_says_so(tok):
    """`TrainBatch.behaviour="sampler"` (the asynchronous collector's batches): the PPO ratio's old
    log-probs are the sampler's, not recomputed by the actor. Sampler log-probs equal to the
    policy's own give the on-policy update; sampler log-probs far from them are clipped."""
    optim = OptimConfig(lr=1e-2, mini_batches=1)
    algo = AlgoConfig(logprob_impl="torch", loss_impl="torch")
    batch = _batch(tok, 0, mini_batches=1)
    probe = Actor(_model(tok), tok, optim, algo, total_optimizer_steps=1)
    with torch.no_grad():
        own = [probe.policy.of(mb, temperature=1.0, with_entropy=False, impl="torch")[0] for mb in batch.micro_batches]
    as_sampled = dataclasses.replace(
        batch,
        mini_batches=[[dataclasses.replace(mb, sampler_logprobs=lp) for mb, lp in zip(batch.micro_batches, own)]],
        behaviour="sampler",
    )
    runs = {}
    for name, b in (("current", batch), ("own", as_sampled), ("far", dataclasses.replace(batch, behaviour="sampler"))):
        actor = Actor(_model(tok), tok, optim, algo, total_optimizer_steps=1)
        runs[name] = (actor.update(b), _weights(actor))
    (m_cur, w_cur), (m_own, w_own), (m_far, w_far) = runs["current"], runs["own"], runs["far"]
    assert m_cur["actor/grad_norm"] > 0
    assert m_own["actor/loss"] == pytest.approx(m_cur["actor/loss"], rel=1e-5, abs=1e-7)
    for k in w_cur:
        torch.testing.assert_close(w_own[k], w_cur[k], rtol=0, atol=1e-6, msg=k)
    clipped = m_far["actor/clipfrac_upper"] + m_far.get("actor/clipfrac_lower", 0.0)
    assert m_cur["actor/clipfrac_upper"] == 0 and clipped > 0.1, m_far
    assert any(not torch.equal(w_far[k], w_cur[k]) for k in w_cur)


def test_decoupled_ppo_clips_against_the_recomputed_policy_and_weighs_by_the_sampler_ratio(tok):
    """`TrainBatch.behaviour="decoupled"` (`algo.off_policy_loss=decoupled`): the PPO ratio is taken
    against the proximal policy, recomputed as the update starts, so a sampler far from it clips
    nothing; the proximal/sampler ratio weighs each token, truncated at the cap. The sampler
    thought every token 3x less likely than the policy does: every weight is 3 truncated to 2, so
    the gradient is twice the on-policy one; a sampler equal to the policy gives the on-policy
    update."""
    optim = OptimConfig(lr=1e-2, mini_batches=1)
    plain = AlgoConfig(logprob_impl="torch", loss_impl="torch")
    corrected = dataclasses.replace(plain, rollout_correction="token_tis", rollout_correction_cap=2.0)
    batch = _batch(tok, 1, mini_batches=1)
    probe = Actor(_model(tok), tok, optim, plain, total_optimizer_steps=1)
    with torch.no_grad():
        own = [probe.policy.of(mb, temperature=1.0, with_entropy=False, impl="torch")[0] for mb in batch.micro_batches]

    def sampled(shift: float, behaviour: str):
        minis = [[dataclasses.replace(mb, sampler_logprobs=lp + shift) for mb, lp in zip(batch.micro_batches, own)]]
        return dataclasses.replace(batch, mini_batches=minis, behaviour=behaviour)

    runs = {}
    for name, algo, b in (
        ("current", plain, batch),
        ("decoupled, same", corrected, sampled(0.0, "decoupled")),
        ("decoupled, far", corrected, sampled(-1.0986122886681098, "decoupled")),  # log(1/3)
        ("sampler, far", plain, sampled(-1.0986122886681098, "sampler")),
    ):
        actor = Actor(_model(tok), tok, optim, algo, total_optimizer_steps=1)
        runs[name] = (actor.update(b), _weights(actor))
    m_cur, w_cur = runs["current"]
    m_same, w_same = runs["decoupled, same"]
    m_far, _ = runs["decoupled, far"]
    m_plain_far, _ = runs["sampler, far"]
    assert m_cur["actor/grad_norm"] > 0
    assert m_same["actor/rollout_correction_weight"] == pytest.approx(1.0, abs=1e-5)
    for k in w_cur:
        torch.testing.assert_close(w_same[k], w_cur[k], rtol=0, atol=1e-6, msg=k)
    assert m_far["actor/rollout_correction_weight"] == pytest.approx(2.0, rel=1e-5)
    assert m_far["actor/grad_norm"] == pytest.approx(2 * m_cur["actor/grad_norm"], rel=1e-4)
    clipped = lambda m: m.get("actor/clipfrac_upper", 0.0) + m.get("actor/clipfrac_lower", 0.0)  # noqa: E731
    assert clipped(m_far) == 0 and clipped(m_plain_far) > 0.1, (m_far, m_plain_far)
