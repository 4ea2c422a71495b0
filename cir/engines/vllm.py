"""`VLLMEngine`: the engine interface on vLLM's v1 engine, in the trainer's process.

Why the synchronous `LLMEngine` and not `AsyncLLM`. vLLM's `AsyncLLM` always runs its engine core
(scheduler, model, KV cache) in a child process (`EngineCoreClient.make_async_mp_client`), so
it cannot live in the trainer's process, and new weights would have to be serialized to it.
`LLMEngine` with `VLLM_ENABLE_V1_MULTIPROCESSING=0` runs the same engine core (continuous
batching, prefix caching, the same sampler and stop-string handling) in this process, where the
worker is reachable and weights are loaded without a copy in between. One engine thread owns it
and is the only thread that touches vLLM: it admits the requests that arrived, runs one engine
step (a batched forward pass over every running request) and resolves the futures of the
requests that finished, so a request joins and leaves the batch at any step and one trajectory
waiting on the sandbox never holds up the others. `generate` bridges that thread's
`concurrent.futures.Future` into whatever event loop the caller runs (`asyncio.wrap_future`),
which matters because cir's rollout starts a new event loop for every rollout. The thread, its
queue, pause/resume, cancellation and close are the skeleton both engines share
(`cir.engines.worker.WorkerEngine`); this module adds what is vLLM's.

Pause. A paused request's partial output is read from vLLM's own record of it (the output
processor's request state: the token ids and sampled log-probs it holds after the last step),
then the request is aborted in vLLM (`abort_request`). The caller resubmits prompt + those tokens
as a new request, which vLLM prefills again (after a weight load the prefix cache is reset, so
nothing computed under the old weights is reused).

Token ids in, token ids and per-token sampler log-probs out. Log-probs are vLLM's
"processed_logprobs": log softmax of the logits after temperature and after top-k/top-p. cir's
definition is log softmax(logits / T) over the full vocabulary, before top-k/top-p (for greedy,
log softmax(logits)); the two agree exactly when top-k/top-p are off, so sampled requests with
top_p < 1 or top_k > 0 are refused (greedy ones ignore both, in vLLM as in cir).

Stop rules. vLLM cannot run a Python predicate after every token, so `stop_rules` is empty: the
rollout sends the rule's stand-in stop string ("```", see `cir.engines.base.stop_rule_strings`)
and decides itself whether the block is closed (a false stop on an opening fence continues the
trajectory with another request; prefix caching makes that cheap). The token that completes a
stop string is kept whole in the token ids, extra text included, as vLLM keeps it.

Weights. `load_weights` takes full tensors under Hugging Face names and reloads them in place
through vLLM's layerwise reload (`reload_weights` on the worker), which re-runs each layer's
post-load processing: on CPU vLLM repacks linear weights for oneDNN and drops the plain tensor,
so writing into parameters directly has no effect. A layer whose tensors are split over two
buckets (q/k/v or gate/up feed one fused vLLM layer) is held back until its last tensor arrives,
since reloading a layer half-way would leave the rest of it uninitialised. Then the prefix cache
is reset (running requests are preempted and recomputed), so no KV computed with old weights is
reused.

Weights on a GPU: two CUDA streams. vLLM's engine thread works on a stream of its own (vLLM sets
one per thread, for CUDA-graph capture), while the trainer's thread wrote the bucket on its
current stream (FSDP2's all-gather, or the optimizer step for one process's live parameters),
and nothing orders the two: the engine could copy a bucket the all-gather has not written yet,
and the trainer could reuse or overwrite the bucket's memory while the engine's copies are still
queued. `load_weights` therefore records an event on the trainer's stream that the engine's
stream waits on before its first copy, and the engine's stream records one, once its copies are
queued, that the trainer's stream waits on before anything it queues next (`_StreamHandoff`):
device-side waits, no host synchronisation.

Under torchrun (data-parallel SPMD: every rank generates for its own shard of the step's
prompts), each rank runs its own engine with vLLM's `distributed_executor_backend=
"external_launcher"` and tensor, pipeline and data parallel sizes all 1. Why that setting, from
vLLM 0.32's source:
- vLLM's `init_distributed_environment` keeps a default process group that already exists (cir
  joins it before the engine starts) and builds its own groups on top of it with `new_group`.
  It lays the world out as external-DP x DP x PP x PCP x TP; with DP = PP = PCP = TP = 1 every
  rank is a tensor-parallel group of one, so its forward passes run no collective and the ranks'
  engines step independently, each on its own requests (the "external DP" verl uses).
- The default "uni" executor takes rank 0 and the device index from the device string for
  every process, so under torchrun each rank's engine would claim GPU 0; the external launcher
  reads RANK and LOCAL_RANK from torchrun's environment, and its worker uses `cuda:LOCAL_RANK`.
- vLLM's own data parallelism (`data_parallel_size` = world size) is the wrong shape: it makes
  the ranks one engine whose DP ranks must step in lockstep (dummy batches when one has no
  work), which is meant for MoE expert parallelism, not for independent rollouts.
Building the groups is collective, so every rank starts its engine at the same point (the
trainer does so in its constructor); at start-up the external launcher also takes the minimum
KV-cache size over ranks (one all-reduce). The process group stays cir's: `close` frees the
groups vLLM built (locally, no collective) and leaves the default group alone (vLLM's own
shutdown would destroy it).

GPU memory. vLLM takes `gpu_memory_utilization` of the GPU's memory (weights, activations, KV
cache) and refuses to start when less is free. Next to a trainer, whose weights, gradients and
optimizer state stay on the same GPU while the engine is awake (sleep frees only the engine's
memory, during the update), the share must leave room for them: the trainer passes its
`run.engine_gpu_memory`, not vLLM's default of nearly the whole GPU.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import itertools
import json
import logging
import math
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from cir.engines.base import ABORTED, Completion, SamplingParams, checked_request
from cir.engines.worker import DEFAULT_TIMEOUT_S, WorkerEngine, fail, resolve

# KV cache size on CPU (GiB) unless the user set VLLM_CPU_KVCACHE_SPACE: vLLM's default takes a
# large share of the machine's memory, and tests and the demo need little.
DEFAULT_CPU_KVCACHE_GIB = "1"

# vLLM's loggers that report, on every partial reload, each layer the bucket did not contain.
_RELOAD_LOGGERS = (
    "vllm.model_executor.model_loader.reload.layerwise",
    "vllm.model_executor.model_loader.reload.inplace",
)


# vLLM keeps process-wide state (its torch.distributed group, the current config), so one engine
# runs in a process at a time; the next starts after the previous one's close().
_LIVE_LOCK = threading.Lock()
_live_engine: VLLMEngine | None = None


# Variables vLLM's CPU worker sets for a process of its own (a preloaded OpenMP library, its
# library path, a local world size). In the trainer's process they would reach every process
# started later (sandbox, grader workers, compilers) and launchers reading LOCAL_WORLD_SIZE, so
# they are put back once the engine has started.
_PROCESS_ENVIRONMENT = ("LD_PRELOAD", "LD_LIBRARY_PATH", "LOCAL_WORLD_SIZE")


def _restore_environment(saved: dict[str, str | None]) -> None:
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def _prepare_environment() -> None:
    """Environment vLLM reads when it starts: in-process engine core, and a small CPU KV cache."""
    # LLMEngine starts its engine core in a child process unless this is 0.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if not torch.cuda.is_available():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", DEFAULT_CPU_KVCACHE_GIB)


@dataclass(eq=False)
class _Request:
    request_id: str
    prompt_ids: list[int]
    params: object  # vllm.SamplingParams
    future: concurrent.futures.Future
    # The id vLLM keys the request's state by (the request id with a random suffix), once admitted.
    internal_id: str | None = None


class VLLMEngine(WorkerEngine):
    """Generation on vLLM (see the module docstring).

    `model`: a Hugging Face model folder (config, tokenizer, weights) or, with
    `load_format="dummy"`, one with only config and tokenizer whose weights then arrive through
    `load_weights` (`from_model` does that for a `transformers` model object). `tokenizer`: the
    tokenizer the caller uses (the rollout decodes with it); default: the folder's. `dtype`:
    "float32", "bfloat16", ... or "auto" (the config's). `max_model_len`: prompt + completion
    limit (default: the model config's). `weight_names`: the Hugging Face names of all the
    model's tensors (default: the folder's safetensors), to tell when a fused layer's last tensor
    has arrived in `load_weights`. `gpu_memory_utilization`: the share of this rank's GPU the
    engine may take (default: vLLM's, for an engine alone on its GPU; ignored on a CPU).
    `engine_kwargs`: more `vllm.EngineArgs` fields. `timeout_s`: the longest `pause`, `close`,
    `load_weights`, `sleep` and `wake` wait for the engine thread before raising TimeoutError.
    Requests, pause/resume, activity and close: see `cir.engines.worker.WorkerEngine`.

    One VLLMEngine runs in a process at a time: close one before starting the next. Under
    torchrun (a default process group exists when the engine starts) every rank builds its own
    engine at the same point of its program (see the module docstring).
    """

    # The stop rules this engine evaluates per token: none (see cir.engines.base.evaluates_stop_rule).
    stop_rules: frozenset[str] = frozenset()

    def __init__(
        self,
        model: str | os.PathLike,
        tokenizer=None,
        *,
        dtype: str = "auto",
        max_model_len: int | None = None,
        max_batch_size: int = 256,
        seed: int = 0,
        load_format: str = "auto",
        enforce_eager: bool | None = None,
        weight_names: Iterable[str] | None = None,
        gpu_memory_utilization: float | None = None,
        engine_kwargs: dict | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        _owned_dir: str | None = None,
    ):
        super().__init__("VLLMEngine", timeout_s=timeout_s)
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self._owned_dir = _owned_dir  # a temporary folder this engine deletes on close
        self._in_job_group = False  # a torchrun job's process group exists (set below)
        folder = Path(model)
        if not (folder / "config.json").is_file():
            self._remove_owned_dir()
            raise ValueError(f"VLLMEngine: {folder} is not a Hugging Face model folder (no config.json)")
        try:
            _check_head_size(folder)
            _prepare_environment()
            from transformers import AutoTokenizer
            from vllm import EngineArgs

            self._tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(folder)
            on_gpu = torch.cuda.is_available()
            args = dict(
                model=str(folder),
                dtype=dtype,
                seed=seed,
                max_model_len=max_model_len,
                max_num_seqs=max_batch_size,
                load_format=load_format,
                enable_prefix_caching=True,
                logprobs_mode="processed_logprobs",
                # Sampling settings come from cir's SamplingParams only, never from the folder's
                # generation_config.json.
                generation_config="vllm",
                # On a CPU, compilation costs more start-up time than it saves on small models.
                enforce_eager=(not on_gpu) if enforce_eager is None else enforce_eager,
                enable_sleep_mode=on_gpu,
                disable_log_stats=True,
            )
            if on_gpu and gpu_memory_utilization is not None:
                args["gpu_memory_utilization"] = gpu_memory_utilization
            self._in_job_group = _in_process_group()
            if self._in_job_group:
                args.update(_external_launcher_args())
            if not on_gpu:
                # A prompt prefilled in chunks makes vLLM rewind a seeded request's random stream
                # (`Generator.set_offset`), which CPU generators do not support: a seeded request
                # with a long prompt would crash the engine. Whole prompts in one step avoid it.
                args["enable_chunked_prefill"] = False
            args.update(engine_kwargs or {})
            self._engine_args = EngineArgs(**args)
            _claim_process(self)
        except BaseException:
            self._remove_owned_dir()
            raise
        self._sleep_supported = bool(args["enable_sleep_mode"])
        self._ids = itertools.count()
        self._running: dict[str, _Request] = {}  # engine thread only
        self._llm = None
        # In-process vLLM seeds the process's global random generators with `seed` when it starts;
        # the trainer's streams are put back as they were.
        rng_states = _global_rng_states()
        try:
            self._start_thread()  # builds vLLM's engine on the engine thread (_on_thread_start)
        except BaseException as error:
            self._remove_owned_dir()
            _release_process(self)
            raise RuntimeError(f"VLLMEngine: vLLM could not start on {folder}: {error}") from error
        finally:
            _restore_global_rng_states(rng_states)
        try:
            config = self._llm.model_config
            self._max_model_len = int(config.max_model_len)
            self._vocab_size = int(config.get_vocab_size())
            self._packed = self._call(self._packed_modules_mapping, "reading the model's fused layers")
            # Which tensors form one fused vLLM layer, so a bucket never reloads half a layer.
            self._group_names: dict[str, frozenset[str]] = {}
            self._held: dict[str, dict[str, torch.Tensor]] = {}
            names = list(weight_names) if weight_names is not None else _checkpoint_names(folder)
            groups: dict[str, set[str]] = collections.defaultdict(set)
            for name in names:
                groups[self._group_of(name)].add(name)
            self._group_names = {key: frozenset(members) for key, members in groups.items()}
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_model(cls, model, tokenizer, *, dtype: str | None = None, **kwargs) -> VLLMEngine:
        """An engine serving `model` (a `transformers` causal LM) with `tokenizer`.

        vLLM needs a folder: the model's config and the tokenizer are written to a temporary one
        (deleted on close), vLLM starts with dummy weights, and the model's weights are then
        pushed through `load_weights`: no weight file is written. `dtype` defaults to the
        model's parameters' dtype.
        """
        folder = tempfile.mkdtemp(prefix="cir-vllm-")
        try:
            model.config.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            if dtype is None:
                dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
            state = model.state_dict()
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        engine = cls(
            folder, tokenizer, dtype=dtype, load_format="dummy", weight_names=list(state), _owned_dir=folder, **kwargs
        )
        try:
            engine.load_weights(state.items())
        except BaseException:
            engine.close()
            raise
        return engine

    # -- public API ------------------------------------------------------------------------

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def max_model_len(self) -> int:
        """Most tokens (prompt + completion) one sequence may hold."""
        return self._max_model_len

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Reload new policy weights (full tensors, Hugging Face names; one bucket per call) in
        place, then reset the prefix cache. Tensors of a fused layer that is not complete yet are
        copied and held until the rest of the layer arrives. Waits for the engine step in
        progress; call it while paused or between rollouts (requests in flight are recomputed
        with the new weights)."""
        ready: list[tuple[str, torch.Tensor]] = []
        arrived: dict[str, list[tuple[str, torch.Tensor]]] = collections.defaultdict(list)
        for name, tensor in named_tensors:
            arrived[self._group_of(name)].append((name, tensor.detach()))
        for key, tensors in arrived.items():
            members = self._group_names.get(key)
            held = self._held.get(key, {})
            if members is None or members <= set(held) | {name for name, _ in tensors}:
                ready.extend(self._held.pop(key, {}).items())
                ready.extend(tensors)
            else:  # the rest of this layer comes in a later bucket: keep a copy meanwhile
                self._held.setdefault(key, {}).update((name, t.to("cpu", copy=True)) for name, t in tensors)
        if ready:
            handoff = _StreamHandoff.from_trainer([t for _, t in ready])
            self._call(lambda: handoff.on_engine(lambda: self._reload(ready)), "load_weights")
            handoff.back_on_trainer()

    def sleep(self) -> None:
        """On a GPU: offload the weights to CPU memory and free the KV cache (vLLM's sleep mode,
        level 1) while the trainer updates; call `wake` before the next `load_weights`. On a CPU
        the memory part is skipped (vLLM has no sleep mode there, and nothing competes for the
        memory). Call it while paused: requests still in flight are resolved first, as a pause
        resolves them ("aborted"), since vLLM's own sleep would drop them without an output."""
        self._call(self._sleep_now, "sleep")

    def wake(self) -> None:
        """Take back what `sleep` freed, before the next rollout (no-op on a CPU)."""
        if self._sleep_supported:
            self._call(lambda: self._llm.wake_up(), "wake")

    def close(self, timeout_s: float | None = None) -> None:
        """Stop the engine thread, shut vLLM down and free its memory, so that another engine can
        start in this process. Requests still queued or running fail with RuntimeError."""
        super().close(timeout_s)
        self._remove_owned_dir()
        _release_process(self)

    # -- caller threads ----------------------------------------------------------------------

    def _make_request(self, prompt_ids: Sequence[int], params: SamplingParams) -> _Request:
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.sampling_params import RequestOutputKind

        prompt = checked_request(prompt_ids, params, self._vocab_size)
        if params.temperature > 0 and (params.top_p < 1 or params.top_k > 0):
            raise ValueError(
                f"VLLMEngine: top_p={params.top_p}, top_k={params.top_k} at temperature {params.temperature} is not "
                "supported: vLLM's sampler log-probs are taken after top-k/top-p truncation, while cir's are over "
                "the full vocabulary (log softmax(logits / T)), so the trainer's ratio would be off; use top_p=1, "
                "top_k=0 (or the transformers engine)"
            )
        if params.stop_rule is not None:
            raise ValueError(
                f"VLLMEngine evaluates no stop rule per token (stop_rule={params.stop_rule!r}): send the rule's "
                "stand-in stop strings (cir.engines.base.stop_rule_strings) and check the rule on the completion, "
                "as cir.rollout does"
            )
        if len(prompt) >= self._max_model_len:
            raise ValueError(
                f"generate: prompt of {len(prompt)} tokens leaves no room to generate within the model's context "
                f"of {self._max_model_len} tokens (max_model_len)"
            )
        stop_strings = [s for s in params.stop_strings if s]
        vllm_params = VLLMSamplingParams(
            n=1,
            temperature=params.temperature,
            seed=params.seed,
            # The whole sequence (prompt + completion) fits in the model's context.
            max_tokens=min(params.max_new_tokens, self._max_model_len - len(prompt)),
            stop=stop_strings or None,
            stop_token_ids=list(params.stop_token_ids),
            # EOS ends a completion only when the caller lists it (cir.rollout does, with
            # stop_on_eos), as in the transformers engine.
            ignore_eos=True,
            include_stop_str_in_output=True,
            logprobs=0,  # the sampled token's log-prob only
            detokenize=bool(stop_strings),  # text is needed only to find stop strings
            skip_special_tokens=False,
            spaces_between_special_tokens=False,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        return _Request(f"cir-{next(self._ids)}", prompt, vllm_params, concurrent.futures.Future())

    def _remove_owned_dir(self) -> None:
        if self._owned_dir is not None:
            shutil.rmtree(self._owned_dir, ignore_errors=True)
            self._owned_dir = None

    def _group_of(self, name: str) -> str:
        """The vLLM layer a Hugging Face tensor name loads into: its module path, with the
        packed sub-module (q_proj, k_proj, ...) replaced by its fused layer (qkv_proj)."""
        parts = name.split(".")
        module = parts[:-1]
        if module and module[-1] in self._packed:
            module = [*module[:-1], self._packed[module[-1]]]
        return ".".join(module)

    # -- engine thread -----------------------------------------------------------------------

    def _on_thread_start(self) -> None:
        from vllm.v1.engine.llm_engine import LLMEngine

        set_num_threads = torch.set_num_threads
        environment = {name: os.environ.get(name) for name in _PROCESS_ENVIRONMENT}
        try:
            self._llm = LLMEngine.from_engine_args(self._engine_args)
        finally:
            # vLLM's CPU worker replaces torch.set_num_threads process-wide (it expects a process
            # of its own); in the trainer's process the trainer keeps control of its threads.
            torch.set_num_threads = set_num_threads
            _restore_environment(environment)

    def _on_thread_exit(self) -> None:
        self._shutdown_vllm()

    def _admit(self, requests: list[_Request]) -> None:
        for request in requests:
            try:
                request.internal_id = self._llm.add_request(
                    request.request_id, {"prompt_token_ids": request.prompt_ids}, request.params
                )
            except BaseException as error:  # vLLM refused the request
                fail(request.future, error)
                continue
            self._running[request.request_id] = request

    def _step(self) -> None:
        for output in self._llm.step():
            if not output.finished:
                continue
            request = self._running.pop(output.request_id, None)
            if request is None or request.future.done():
                continue
            try:
                completion = _completion(output)
            except BaseException as error:
                fail(request.future, error)
            else:
                resolve(request.future, completion)

    def _in_flight(self):
        return self._running.values()

    def _abort(self, requests: list[_Request]) -> None:
        ids = [r.request_id for r in requests if self._running.pop(r.request_id, None) is not None]
        if ids:
            self._llm.abort_request(ids)
            if not self._running:  # a pause (not a cancellation among running requests)
                self._finish_launched_batches()

    def _partial(self, request: _Request) -> Completion:
        """What vLLM holds for a running request after the last step: its output token ids and
        their sampled log-probs (none for one still waiting in vLLM's scheduler)."""
        state = self._llm.output_processor.request_states.get(request.internal_id)
        if state is None:
            return Completion([], [], ABORTED)
        token_ids = [int(t) for t in state.detokenizer.output_token_ids]
        return Completion(token_ids, _sampled_logprobs(state.logprobs_processor.logprobs, token_ids), ABORTED)

    def _reset(self) -> None:
        running, self._running = list(self._running), {}
        if running and self._llm is not None:
            self._llm.abort_request(running)

    def _finish_launched_batches(self) -> None:
        """With asynchronous scheduling (vLLM's default on GPUs; off on CPUs) a step may return
        while the next batch is already running on the device; once every request is aborted,
        collect it, so that nothing runs after a pause (its tokens belong to aborted requests and
        are dropped). With requests still running, the next step would schedule more batches."""
        core = getattr(self._llm.engine_core, "engine_core", None)
        while getattr(core, "batch_queue", None):
            self._llm.step()

    def _sleep_now(self) -> None:
        self._abort_in_flight()
        if self._sleep_supported:
            self._llm.sleep(level=1)

    def _packed_modules_mapping(self) -> dict[str, str]:
        """Sub-module name -> the fused vLLM layer it loads into (e.g. "q_proj" -> "qkv_proj")."""
        (mapping,) = self._llm.apply_model(lambda model: dict(getattr(model, "packed_modules_mapping", {}) or {}))
        return {part: fused for fused, parts in mapping.items() for part in parts}

    def _reload(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        # Partial reloads are intended here: vLLM would warn about every layer not in the bucket.
        levels = [(logging.getLogger(name), logging.getLogger(name).level) for name in _RELOAD_LOGGERS]
        for logger, _ in levels:
            logger.setLevel(logging.ERROR)
        try:
            self._llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
        finally:
            for logger, level in levels:
                logger.setLevel(level)
        # Running requests are preempted and recomputed: no KV from the old weights survives.
        self._llm.reset_prefix_cache(reset_running_requests=True)

    def _shutdown_vllm(self) -> None:
        """Free the engine core, its KV cache and the process-wide state vLLM set up (its
        torch.distributed groups), so a later engine in this process starts cleanly. A default
        process group that existed before the engine (torchrun's, joined by cir) is kept."""
        llm, self._llm = self._llm, None
        with _default_group_kept() if self._in_job_group else contextlib.nullcontext():
            if llm is not None:
                with contextlib.suppress(Exception):
                    llm.engine_core.shutdown()
                del llm
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

            cleanup_dist_env_and_memory()


class _StreamHandoff:
    """Orders a weight hand-off between the trainer's CUDA stream and the engine thread's.

    `from_trainer` (trainer's thread): an event on each device's current stream, after the work
    that wrote the bucket. `on_engine(copy)` (engine thread): its current stream waits on those
    events, `copy` queues the copies, and an event is recorded behind them. `back_on_trainer`
    (trainer's thread): the trainer's streams wait on that event, so neither the bucket's memory
    (freed and reused by the caching allocator) nor live parameters (a later optimizer step) are
    written before the engine has read them. Without CUDA tensors in the bucket, each is a no-op.
    """

    def __init__(self, ready: dict[torch.device, torch.cuda.Event]):
        self._ready = ready
        self._done: dict[torch.device, torch.cuda.Event] = {}

    @classmethod
    def from_trainer(cls, tensors: Iterable[torch.Tensor]) -> _StreamHandoff:
        ready = {}
        for device in {t.device for t in tensors if t.is_cuda}:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
            ready[device] = event
        return cls(ready)

    def on_engine(self, copy: Callable[[], object]):
        for device, event in self._ready.items():
            torch.cuda.current_stream(device).wait_event(event)
        result = copy()
        for device in self._ready:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
            self._done[device] = event
        return result

    def back_on_trainer(self) -> None:
        for device, event in self._done.items():
            torch.cuda.current_stream(device).wait_event(event)


def engine_start_bytes(total_bytes: float, memory_fraction: float) -> int:
    """The GPU memory a vLLM engine takes when it starts with `gpu_memory_utilization` =
    `memory_fraction`: that share of the device's total memory, not of what is free. vLLM refuses
    to start when less than this is free (vLLM 0.32, `vllm.v1.worker.utils.request_memory`)."""
    return math.ceil(total_bytes * memory_fraction)


def reload_temporary_bytes(largest_layer_params: int, dtype_bytes: int) -> int:
    """GPU memory a weight hand-off holds beside the engine's own weights: vLLM's layerwise reload
    (`reload_weights`) materialises a layer's tensors anew in the engine's dtype, loads the bucket
    into them, runs the layer's post-load processing and copies the result over the tensors the
    engine runs with, one layer at a time: at most the largest layer (a fused vLLM layer such as
    qkv_proj or gate_up_proj, or the embedding / LM head) is held twice."""
    return largest_layer_params * dtype_bytes


def _in_process_group() -> bool:
    """Whether this process joined a torch.distributed job (torchrun) before the engine started:
    then the default process group is the job's, not vLLM's."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _external_launcher_args() -> dict:
    """EngineArgs for one rank's own engine in a torchrun job (module docstring: why the
    external launcher with every parallel size 1)."""
    # The external launcher reads the rank and the local rank (its device) from torchrun's
    # variables; a group joined another way gets them from the group and the current device.
    os.environ.setdefault("RANK", str(torch.distributed.get_rank()))
    os.environ.setdefault("LOCAL_RANK", str(torch.cuda.current_device() if torch.cuda.is_available() else 0))
    return dict(
        distributed_executor_backend="external_launcher",
        tensor_parallel_size=1,
        pipeline_parallel_size=1,
        data_parallel_size=1,
    )


@contextlib.contextmanager
def _default_group_kept():
    """While vLLM shuts down, `torch.distributed.destroy_process_group` leaves the default group
    alone and destroys the others.

    vLLM's clean-up (`EngineCore.shutdown` calls `cleanup_dist_env_and_memory`) destroys the
    groups it built (each destruction is local to the rank, no collective) and then the default
    group, assuming it created that too. Under torchrun the default group is the job's, which cir
    joined before the engine started and still needs for its own collectives. vLLM calls the
    function through the `torch.distributed` module, so replacing it there for the duration of
    the shutdown is enough; the engine thread is the only one touching torch.distributed then
    (`close` waits for it)."""
    destroy = torch.distributed.destroy_process_group

    def destroy_unless_default(group=None):
        if group is None or group is torch.distributed.GroupMember.WORLD:
            return
        destroy(group)

    torch.distributed.destroy_process_group = destroy_unless_default
    try:
        yield
    finally:
        torch.distributed.destroy_process_group = destroy


def _global_rng_states() -> tuple:
    import random

    import numpy as np

    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda


def _restore_global_rng_states(states: tuple) -> None:
    import random

    import numpy as np

    python, numpy, cpu, cuda = states
    random.setstate(python)
    np.random.set_state(numpy)
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def _claim_process(engine: VLLMEngine) -> None:
    global _live_engine
    with _LIVE_LOCK:
        if _live_engine is not None:
            raise RuntimeError(
                "VLLMEngine: another VLLMEngine is running in this process (vLLM keeps process-wide state); "
                "close() it before starting a new one"
            )
        _live_engine = engine


def _release_process(engine: VLLMEngine) -> None:
    global _live_engine
    with _LIVE_LOCK:
        if _live_engine is engine:
            _live_engine = None


def _sampled_logprobs(entries, token_ids: list[int]) -> list[float]:
    """The sampled tokens' log-probs from vLLM's per-token log-prob entries."""
    if entries is None or len(entries) != len(token_ids):
        raise RuntimeError(f"vLLM returned {len(entries or [])} log-probs for {len(token_ids)} tokens")
    return [float(entry[token].logprob) for entry, token in zip(entries, token_ids)]


def _completion(output) -> Completion:
    out = output.outputs[0]
    token_ids = [int(t) for t in out.token_ids]
    logprobs = _sampled_logprobs(out.logprobs, token_ids)
    if out.finish_reason == "length":
        return Completion(token_ids, logprobs, "length")
    if out.finish_reason == "stop":
        if isinstance(out.stop_reason, str):
            return Completion(token_ids, logprobs, "stop_string", stop_string=out.stop_reason)
        if isinstance(out.stop_reason, int):
            return Completion(token_ids, logprobs, "stop_token", stop_token_id=out.stop_reason)
    raise RuntimeError(f"vLLM finished a request with finish_reason={out.finish_reason!r}, stop={out.stop_reason!r}")


def _check_head_size(folder: Path) -> None:
    """Fail early, naming the model's head size, where vLLM's CPU attention has no kernel for it."""
    if torch.cuda.is_available():
        return
    config = json.loads((folder / "config.json").read_text())
    config = config.get("text_config", config)
    heads = config.get("num_attention_heads")
    head_size = config.get("head_dim") or (config.get("hidden_size", 0) // heads if heads else None)
    if not head_size:
        return
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    supported = CPUAttentionBackend.get_supported_head_sizes()
    if head_size not in supported:
        raise ValueError(
            f"VLLMEngine: the model in {folder} has attention head size {head_size}; vLLM's CPU backend supports "
            f"{', '.join(map(str, supported))} (hidden_size / num_attention_heads, or head_dim)"
        )


def _checkpoint_names(folder: Path) -> list[str]:
    """The tensor names of a folder's safetensors checkpoint (headers only), or [] if none."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return []
    from safetensors import safe_open

    names: list[str] = []
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            names.extend(f.keys())
    return names
