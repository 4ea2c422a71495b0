"""`HFEngine`: the engine interface on `transformers` + torch, with continuous batching.

Requests arrive from many coroutines at once (`await engine.generate(...)`). A worker thread
owns the model and a batched KV cache; at every iteration it

1. prefills the requests that arrived since the last iteration (one padded forward pass over
   their prompts, in a cache of their own), samples their first token and merges their rows
   into the running cache, and
2. runs one decoding step for every running row, samples, checks stop conditions, and drops the
   rows that finished, resolving their futures at once.

So a request joins the batch without waiting for the others to finish and leaves it the step
it finishes. The forward passes run on the worker thread, off the event loop, so sandbox
calls and other coroutines make progress while the model computes (torch releases the GIL).
The thread, its queue, pause/resume, cancellation and close are the skeleton both engines share
(`cir.engines.worker.WorkerEngine`); this module adds the batch: admitting requests (prefill),
one decoding step, dropping rows (a cancelled or paused request's row leaves the batched cache
with one gather) and a running request's partial output.

Cache layout. All rows append at the same column, so rows are left-padded: row b's tokens
occupy columns [pad[b], U) of the live cache window (U = live length). A token's position id
is its column minus pad[b], so positions are exact per row whatever the batch looks like. The
keys/values sit in a preallocated buffer per layer that grows by doubling (no per-step
concatenation); finished rows are removed with one gather, and columns that no row uses any
more are dropped by moving the window start. The attention mask is built here and passed to
the model directly (4D, per layer type), which supports the "sdpa" and "eager" attention
implementations. Pad query positions attend to themselves, so no attention row is empty (no
NaN anywhere in the cache).

Sampling is vectorised over the batch; the only per-row work is one uniform draw from the
request's own random stream (inverse-CDF sampling), which makes seeded results independent of
batch composition.

Models: decoder-only `transformers` models whose forward takes a prepared mask mapping
(`attention_mask={"full_attention": ...}`), explicit `position_ids` and `logits_to_keep`, as
the Qwen2/Qwen3/Llama/Mistral families do.
"""

from __future__ import annotations

import concurrent.futures
import copy
import random
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, DynamicLayer

from cir.engines.base import ABORTED, Completion, SamplingParams, StopPredicate, checked_request, stop_rule
from cir.engines.worker import DEFAULT_TIMEOUT_S, WorkerEngine, fail, resolve

_SUPPORTED_ATTENTION = ("sdpa", "eager")
_SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")


# ----------------------------------------------------------------------------------------------
# Batched KV cache
# ----------------------------------------------------------------------------------------------


class _RowKVLayer(DynamicLayer):
    """One layer's keys/values in a buffer [rows, kv_heads, capacity, head_dim].

    The live window is columns [begin, end); every row appends at `end`. The buffer grows by
    doubling, so appending a token costs O(1) amortised instead of a full copy.
    """

    def __init__(self):
        super().__init__()
        self.buf_k: torch.Tensor | None = None
        self.buf_v: torch.Tensor | None = None
        self.begin = 0
        self.end = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def _reserve(self, extra: int) -> None:
        """Make room for `extra` more columns after `end`, compacting the window to column 0."""
        used = self.end - self.begin
        if self.end + extra <= self.buf_k.shape[2]:
            return
        capacity = max(2 * used + extra, used + extra + 64)
        b, h, _, d = self.buf_k.shape
        new_k = self.buf_k.new_empty(b, h, capacity, d)
        new_v = self.buf_v.new_empty(b, h, capacity, d)
        new_k[:, :, :used] = self.buf_k[:, :, self.begin : self.end]
        new_v[:, :, :used] = self.buf_v[:, :, self.begin : self.end]
        self.buf_k, self.buf_v, self.begin, self.end = new_k, new_v, 0, used

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        q = key_states.shape[-2]
        if self.buf_k is None:
            self.lazy_initialization(key_states, value_states)
            b, h, _, d = key_states.shape
            self.buf_k = key_states.new_empty(b, h, q + 64, d)
            self.buf_v = value_states.new_empty(b, h, q + 64, d)
            self.begin = self.end = 0
        else:
            self._reserve(q)
        self.buf_k[:, :, self.end : self.end + q] = key_states
        self.buf_v[:, :, self.end : self.end + q] = value_states
        self.end += q
        self.keys = self.buf_k[:, :, self.begin : self.end]
        self.values = self.buf_v[:, :, self.begin : self.end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.end - self.begin

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.end - self.begin + query_length, 0

    def live(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.buf_k[:, :, self.begin : self.end], self.buf_v[:, :, self.begin : self.end]

    def set_live(self, k: torch.Tensor, v: torch.Tensor, headroom: int) -> None:
        """Replace the contents with `k`/`v` (already [rows, heads, used, dim]) plus spare columns."""
        b, h, used, d = k.shape
        self.buf_k = k.new_empty(b, h, used + headroom, d)
        self.buf_v = v.new_empty(b, h, used + headroom, d)
        self.buf_k[:, :, :used] = k
        self.buf_v[:, :, :used] = v
        self.begin, self.end = 0, used
        self.keys, self.values = self.live()


class _RowKVCache(Cache):
    """The running batch's KV cache: one `_RowKVLayer` per model layer (created on first use)."""

    def __init__(self):
        super().__init__(layer_class_to_replicate=_RowKVLayer)

    @property
    def live_length(self) -> int:
        return self.layers[0].end - self.layers[0].begin if self.layers else 0

    def drop_leading(self, n: int) -> None:
        """Forget the first `n` live columns (no row uses them any more). No copy."""
        for layer in self.layers:
            layer.begin += n

    def select_rows(self, rows: torch.Tensor, drop_cols: int) -> None:
        """Keep only `rows` (indices) and drop the first `drop_cols` live columns."""
        for layer in self.layers:
            k, v = layer.live()
            k = k[rows, :, drop_cols:]
            v = v[rows, :, drop_cols:]
            layer.set_live(k, v, headroom=max(64, k.shape[2] // 2))

    def merge(self, other: _RowKVCache) -> tuple[int, int]:
        """Append `other`'s rows below ours, right-aligning both windows (left padding).

        Returns the extra left padding given to (our rows, other's rows).
        """
        u_self, u_other = self.live_length, other.live_length
        width = max(u_self, u_other)
        for mine, theirs in zip(self.layers, other.layers):
            k1, v1 = mine.live()
            k2, v2 = theirs.live()
            b1, b2 = k1.shape[0], k2.shape[0]
            h, d = k1.shape[1], k1.shape[3]
            # Zeros, not empty memory: padding columns are masked, but a NaN there would still
            # poison the attention output through 0 * NaN.
            k = k1.new_zeros(b1 + b2, h, width, d)
            v = v1.new_zeros(b1 + b2, h, width, d)
            k[:b1, :, width - u_self :] = k1
            v[:b1, :, width - u_self :] = v1
            k[b1:, :, width - u_other :] = k2
            v[b1:, :, width - u_other :] = v2
            mine.set_live(k, v, headroom=max(64, width // 2))
        return width - u_self, width - u_other


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------


def sample_tokens(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    uniforms: torch.Tensor,
    *,
    all_greedy: bool | None = None,
    any_top_k: bool | None = None,
    any_top_p: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row; returns (token ids [B], their log-probs [B]).

    `logits` [B, V]; per-row `temperature` (0: greedy), `top_k` (0: off), `top_p` (1: off) and a
    uniform draw in [0, 1) from the row's own random stream. The token is drawn by inverse CDF
    from softmax(logits / T) restricted to the top-k and then the top-p set. The log-prob is the
    token's under softmax(logits / T) over the full vocabulary (softmax(logits) for greedy
    rows), normalised in float64: the quantity the trainer recomputes. The optional flags
    (`all_greedy`, `any_top_k`, `any_top_p`) let a caller that already knows them skip device
    synchronisations. One exponential pass over [B, V] serves both the normaliser and the draw.
    """
    logits = logits.float()
    greedy = temperature <= 0
    scale = torch.where(greedy, torch.ones_like(temperature), temperature)
    scaled = logits / scale[:, None]
    best = torch.argmax(scaled, dim=-1, keepdim=True)
    peak = scaled.gather(1, best)
    weights = (scaled - peak).exp_()  # unnormalised softmax, entries in (0, 1]
    # torch's float32 sum is a cascade sum (relative error ~1e-7 over a 150k vocabulary), unlike
    # the running sum inside float32 log_softmax (~3e-4 there); the rest is done in float64.
    log_normaliser = peak.squeeze(1).double() + torch.log(weights.sum(dim=-1).double())
    tokens = best.squeeze(1)
    if all_greedy is None:
        all_greedy = bool(greedy.all())
    if not all_greedy:
        if any_top_k is None:
            any_top_k = bool((top_k > 0).any())
        if any_top_p is None:
            any_top_p = bool((top_p < 1).any())
        if any_top_k:
            k_max = min(int(top_k.max()), scaled.shape[-1])
            kth = torch.topk(scaled, k_max, dim=-1).values
            idx = (top_k.clamp(min=1, max=k_max) - 1)[:, None]
            no_limit = torch.full_like(idx, 0, dtype=scaled.dtype).fill_(float("-inf"))
            threshold = torch.where(top_k[:, None] > 0, kth.gather(1, idx), no_limit)
            weights = weights.masked_fill(scaled < threshold, 0.0)
        if any_top_p:
            sorted_w, order = torch.sort(weights, dim=-1, descending=True)
            mass_before = torch.cumsum(sorted_w, dim=-1) - sorted_w
            total = sorted_w.sum(dim=-1, keepdim=True)
            drop_sorted = mass_before > top_p[:, None] * total  # the first token is never dropped
            drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
            weights = weights.masked_fill(drop, 0.0)
        tokens = torch.where(greedy, tokens, inverse_cdf_draw(weights, uniforms))
    logprobs = scaled.gather(1, tokens[:, None]).squeeze(1).double() - log_normaliser
    return tokens, logprobs


def _block_size(vocab: int) -> int:
    """The largest divisor of `vocab` in [64, 512], or 256 (the row is then zero-padded)."""
    for block in range(512, 63, -1):
        if vocab % block == 0:
            return block
    return 256 if vocab > 512 else vocab


def inverse_cdf_draw(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Index drawn from each row of non-negative `weights` [B, V] with probability ∝ weight.

    Row b gets the first index whose cumulative weight exceeds uniforms[b] x total. The scan is
    done in two levels (sums of blocks of ~500 entries, then the one block the draw falls in),
    which gives the same index as a scan of the whole row but touches each entry once instead
    of running a full-width cumulative sum.
    """
    rows, vocab = weights.shape
    block = _block_size(vocab)
    padded = weights
    if vocab % block:
        padded = torch.nn.functional.pad(weights, (0, block - vocab % block))
    blocks = padded.view(rows, -1, block)
    block_mass = blocks.sum(dim=-1)  # [B, n_blocks]
    block_cdf = block_mass.cumsum(dim=-1)
    target = uniforms[:, None].to(block_cdf.dtype) * block_cdf[:, -1:]
    chosen = torch.searchsorted(block_cdf, target, right=True).clamp(max=block_cdf.shape[1] - 1)
    remaining = target - (block_cdf.gather(1, chosen) - block_mass.gather(1, chosen))
    inner = blocks[torch.arange(rows, device=weights.device), chosen.squeeze(1)]  # [B, block]
    inner_cdf = inner.cumsum(dim=-1)
    offset = torch.searchsorted(inner_cdf, remaining, right=True).clamp(max=block - 1)
    drawn = (chosen * block + offset).clamp(max=vocab - 1)
    # Rounding can put a draw with u ~ 1 just past the last positive entry: move it back.
    landed_on_zero = weights.gather(1, drawn) <= 0
    if bool(landed_on_zero.any()):
        last_positive = vocab - 1 - torch.argmax((weights.flip(-1) > 0).int(), dim=-1, keepdim=True)
        drawn = torch.where(landed_on_zero, last_positive, drawn)
    return drawn.squeeze(1)


# ----------------------------------------------------------------------------------------------
# Requests
# ----------------------------------------------------------------------------------------------


@dataclass(eq=False)  # compared by identity: a request is one row of the batch
class _Request:
    prompt_ids: list[int]
    params: SamplingParams
    max_new: int  # max_new_tokens, capped by the model's positions
    future: concurrent.futures.Future
    # The request's own random stream (None for greedy requests): one uniform per sampled
    # token, so what a seeded request draws never depends on the batch it is in. A Python
    # `random.Random` costs ~0.1 us a draw against ~10 us for a one-element torch tensor.
    rng: random.Random | None
    stop_ids: frozenset[int]
    needs_text: bool
    stop_predicate: StopPredicate | None  # the request's `stop_rule`, resolved
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    # Incremental detokenisation: text of token_ids[:read_offset]; a window starting at
    # prefix_offset is re-decoded each step so multi-token characters come out whole.
    text: str = ""
    prefix_offset: int = 0
    read_offset: int = 0


@dataclass
class EngineStats:
    """Counters of what the engine did (read them for tests and throughput reports)."""

    requests_completed: int = 0
    tokens_generated: int = 0
    prefill_steps: int = 0
    decode_steps: int = 0
    max_batch_size_seen: int = 0  # most rows decoded together in one step
    prefill_tokens: int = 0  # real (unpadded) prompt tokens prefilled


class HFEngine(WorkerEngine):
    """Continuous-batching generation on a `transformers` causal LM (CPU or CUDA).

    Args:
        model: a causal LM (e.g. `Qwen2ForCausalLM`) using "sdpa" or "eager" attention.
        tokenizer: its tokenizer (used to decode text for stop strings and stop rules).
        max_batch_size: most requests decoded together; more wait in a queue.
        device, dtype: where and in what precision to run. With `share_model=True` the model is
            used as it is and these must match it (moving it would move the trainer's model);
            with `share_model=False` the engine works on its own copy, moved here.
        seed: seeds the stream that gives requests without `SamplingParams.seed` their own
            random stream (in submission order), so a whole run is reproducible.
        share_model: use `model` itself instead of a private copy (no second copy of the
            weights in memory; the caller keeps it in eval mode and must not update it while a
            request is in flight). The trainer's engine holds a private copy and receives new
            weights only through `load_weights`.
        max_prefill_tokens: bound on padded prompt tokens per prefill forward (memory).
        timeout_s: the longest `pause`, `close` and `load_weights` wait for the step in progress
            before raising TimeoutError (a stuck engine).

    Requests, pause/resume, activity and close: see `cir.engines.worker.WorkerEngine`.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_batch_size: int = 64,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        seed: int = 0,
        share_model: bool = True,
        max_prefill_tokens: int = 16384,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ):
        super().__init__("HFEngine", timeout_s=timeout_s)
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        param = next(model.parameters())
        if share_model:
            if (
                device is not None
                and torch.device(device) != param.device
                and not (torch.device(device).type == param.device.type and torch.device(device).index is None)
            ):
                raise ValueError(
                    f"share_model=True: the model is on {param.device}, not {device}; move it first "
                    "or pass share_model=False for a private copy"
                )
            if dtype is not None and dtype != param.dtype:
                raise ValueError(
                    f"share_model=True: the model is {param.dtype}, not {dtype}; convert it first "
                    "or pass share_model=False for a private copy"
                )
        else:
            model = copy.deepcopy(model)
            model.to(device=device or param.device, dtype=dtype or param.dtype)
            model.eval()
        self._model = model
        self._tokenizer = tokenizer
        self._device = next(model.parameters()).device
        config = model.config
        if hasattr(config, "get_text_config"):
            config = config.get_text_config(decoder=True)
        attn = getattr(config, "_attn_implementation", None) or "eager"
        if attn not in _SUPPORTED_ATTENTION:
            raise ValueError(
                f"HFEngine builds its own attention masks and supports attn_implementation in "
                f"{_SUPPORTED_ATTENTION}, not {attn!r}; load the model with attn_implementation='sdpa'"
            )
        self._float_mask = attn == "eager"
        self._layer_types = tuple(getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers)
        unsupported = set(self._layer_types) - set(_SUPPORTED_LAYER_TYPES)
        if unsupported:
            raise ValueError(f"HFEngine: unsupported attention layer types {sorted(unsupported)}")
        self._sliding_window = getattr(config, "sliding_window", None)
        self._max_positions = int(getattr(config, "max_position_embeddings", 1 << 30))
        self._vocab_size = int(config.vocab_size)
        self._pad_id = config.pad_token_id if config.pad_token_id is not None else 0
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.stats = EngineStats()

        self._seed_stream = random.Random(seed)
        self._seed_lock = threading.Lock()  # requests are made on the callers' threads
        # Engine-thread state: the running batch.
        self._rows: list[_Request] = []
        self._cache: _RowKVCache | None = None
        self._pad = torch.zeros(0, dtype=torch.long, device=self._device)  # left padding per row
        self._last = torch.zeros(0, dtype=torch.long, device=self._device)  # last sampled token per row
        self._row_params: tuple = (None, None, None)  # (rows list, per-row tensors, flags)
        self._start_thread()

    # -- public API ------------------------------------------------------------------------

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def max_model_len(self) -> int:
        """Most tokens (prompt + completion) one sequence may hold: the model's positions."""
        return self._max_positions

    @property
    def model(self):
        return self._model

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy new policy weights (HF parameter names) into the engine's model.

        Tensors that already are the engine's parameters (same storage: `share_model=True` with
        the trainer's own model) are skipped, so then this is a no-op. Otherwise values are
        copied (any device/dtype is converted). Waits for the forward pass in progress to
        finish; call it while paused (or between rollouts), or requests in flight continue with
        the new weights.
        """
        params = dict(self._model.named_parameters(remove_duplicate=False))  # tied names too
        params.update(dict(self._model.named_buffers(remove_duplicate=False)))
        with self._between_steps("load_weights"), torch.no_grad():
            for name, tensor in named_tensors:
                if name not in params:
                    raise KeyError(f"load_weights: the engine's model has no parameter {name!r}")
                target = params[name]
                if target.data_ptr() == tensor.data_ptr() and target.shape == tensor.shape:
                    continue
                if target.shape != tensor.shape:
                    raise ValueError(
                        f"load_weights: {name} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}"
                    )
                target.copy_(tensor)

    def sleep(self) -> None:
        """Nothing to free: the KV cache lives only while requests run."""

    def wake(self) -> None:
        """Nothing to take back (see `sleep`)."""

    # -- submission (caller threads) ------------------------------------------------------

    def _make_request(self, prompt_ids: Sequence[int], params: SamplingParams) -> _Request:
        prompt = checked_request(prompt_ids, params, self._vocab_size)
        if len(prompt) >= self._max_positions:
            raise ValueError(
                f"generate: prompt of {len(prompt)} tokens leaves no room to generate: the model has "
                f"max_position_embeddings={self._max_positions}"
            )
        predicate = None if params.stop_rule is None else stop_rule(params.stop_rule)
        needs_text = bool(params.stop_strings) or predicate is not None
        if needs_text and self._tokenizer is None:
            raise ValueError("generate: stop_strings / stop_rule need the engine to have a tokenizer")
        rng = None
        if params.temperature > 0:
            if params.seed is not None:
                rng = random.Random(params.seed)
            else:
                with self._seed_lock:
                    rng = random.Random(self._seed_stream.getrandbits(64))
        return _Request(
            prompt_ids=prompt,
            params=params,
            # The whole sequence (prompt + completion) fits in the model's positions.
            max_new=min(params.max_new_tokens, self._max_positions - len(prompt)),
            future=concurrent.futures.Future(),
            rng=rng,
            stop_ids=frozenset(params.stop_token_ids),
            needs_text=needs_text,
            stop_predicate=predicate,
        )

    # -- engine thread: the hooks of WorkerEngine ----------------------------------------------

    def _admissible(self, queue: Sequence[_Request]) -> int:
        """As many queued requests as the batch has rows for, while their padded prompts fit
        `max_prefill_tokens` (the first always does)."""
        taken, longest = 0, 0
        for request in queue:
            if len(self._rows) + taken >= self.max_batch_size:
                break
            width = max(longest, len(request.prompt_ids))
            if taken and width * (taken + 1) > self.max_prefill_tokens:
                break
            taken, longest = taken + 1, width
        return taken

    def _admit(self, requests: list[_Request]) -> None:
        with torch.inference_mode():
            self._prefill(requests)

    def _step(self) -> None:
        with torch.inference_mode():
            self._decode_step()

    def _in_flight(self) -> list[_Request]:
        return self._rows

    def _abort(self, requests: list[_Request]) -> None:
        leaving = {id(r) for r in requests}
        keep = [i for i, r in enumerate(self._rows) if id(r) not in leaving]
        with torch.inference_mode():
            self._keep_rows(keep)

    def _partial(self, request: _Request) -> Completion:
        return Completion(token_ids=list(request.token_ids), logprobs=list(request.logprobs), finish_reason=ABORTED)

    def _reset(self) -> None:
        self._rows, self._cache = [], None
        self._pad, self._last = self._pad[:0], self._last[:0]

    def _keep_rows(self, keep: list[int]) -> None:
        """Keep only the rows `keep` (indices, in order) of the running batch and its cache."""
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._reset()
            return
        keep_t = torch.tensor(keep, dtype=torch.long, device=self._device)
        pad = self._pad[keep_t]
        drop = int(pad.min())
        self._cache.select_rows(keep_t, drop)
        self._rows = [self._rows[i] for i in keep]
        self._pad = pad - drop
        self._last = self._last[keep_t]

    def _attention_masks(self, pad: torch.Tensor, q_len: int, kv_len: int) -> dict[str, torch.Tensor]:
        """Masks [B, 1, q_len, kv_len] for queries at the last `q_len` columns of the window.

        Key column c of row b is visible to query column i if c >= pad[b] (a real token),
        c <= i (causal) and, for sliding layers, i - c < window. Query columns in the padding
        see only themselves, so no attention row is empty.
        """
        cols = torch.arange(kv_len, device=self._device)
        rows = torch.arange(kv_len - q_len, kv_len, device=self._device)
        real = cols[None, None, :] >= pad[:, None, None]  # [B, 1, kv]
        causal = cols[None, :] <= rows[:, None]  # [q, kv]
        diagonal = cols[None, :] == rows[:, None]
        masks = {}
        for layer_type in set(self._layer_types):
            visible = real & causal[None]
            if layer_type == "sliding_attention" and self._sliding_window:
                visible = visible & ((rows[:, None] - cols[None, :]) < self._sliding_window)[None]
            visible = (visible | diagonal[None])[:, None]
            if self._float_mask:
                dtype = next(self._model.parameters()).dtype
                masks[layer_type] = torch.zeros(visible.shape, dtype=dtype, device=self._device).masked_fill(
                    ~visible, torch.finfo(dtype).min
                )
            else:
                masks[layer_type] = visible
        return masks

    def _forward(self, input_ids, position_ids, masks, cache) -> torch.Tensor:
        out = self._model(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=masks,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1, :]

    def _prefill(self, requests: list[_Request]) -> None:
        lengths = [len(r.prompt_ids) for r in requests]
        width = max(lengths)
        input_ids = torch.full((len(requests), width), self._pad_id, dtype=torch.long)
        for i, r in enumerate(requests):
            input_ids[i, width - lengths[i] :] = torch.tensor(r.prompt_ids, dtype=torch.long)
        input_ids = input_ids.to(self._device)
        pad = torch.tensor([width - n for n in lengths], dtype=torch.long, device=self._device)
        positions = (torch.arange(width, device=self._device)[None, :] - pad[:, None]).clamp(min=0)
        cache = _RowKVCache()
        logits = self._forward(input_ids, positions, self._attention_masks(pad, width, width), cache)
        self.stats.prefill_steps += 1
        self.stats.prefill_tokens += sum(lengths)
        tokens, keep = self._sample_and_finish(requests, logits)
        if not keep:
            return
        requests = [requests[i] for i in keep]
        keep_t = torch.tensor(keep, dtype=torch.long, device=self._device)
        tokens, pad = tokens[keep_t], pad[keep_t]
        if len(keep) < len(lengths):
            drop = int(pad.min())
            cache.select_rows(keep_t, drop)
            pad = pad - drop
        if self._cache is None or not self._rows:
            self._cache, self._rows, self._pad, self._last = cache, requests, pad, tokens
            return
        try:
            extra_mine, extra_new = self._cache.merge(cache)
        except BaseException as error:  # a half-merged cache is unusable: fail the running rows too
            for request in self._rows:
                fail(request.future, error)
            self._reset()
            raise
        self._rows = self._rows + requests
        self._pad = torch.cat([self._pad + extra_mine, pad + extra_new])
        self._last = torch.cat([self._last, tokens])

    def _decode_step(self) -> None:
        batch = len(self._rows)
        self.stats.max_batch_size_seen = max(self.stats.max_batch_size_seen, batch)
        live = self._cache.live_length
        positions = (live - self._pad)[:, None]
        masks = self._attention_masks(self._pad, 1, live + 1)
        logits = self._forward(self._last[:, None], positions, masks, self._cache)
        self.stats.decode_steps += 1
        tokens, keep = self._sample_and_finish(self._rows, logits)
        self._last = tokens
        self._keep_rows(keep)

    def _sample_and_finish(self, requests: list[_Request], logits: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """Sample a token per row, record it, resolve finished requests.

        Returns the sampled tokens [B] and the indices of the rows that go on.
        """
        if self._row_params[0] is not requests:  # the batch changed: rebuild per-row settings
            temperatures = [r.params.temperature for r in requests]
            top_ks = [r.params.top_k for r in requests]
            top_ps = [r.params.top_p for r in requests]
            tensors = (
                torch.tensor(temperatures, dtype=torch.float32, device=self._device),
                torch.tensor(top_ks, dtype=torch.long, device=self._device),
                torch.tensor(top_ps, dtype=torch.float32, device=self._device),
            )
            flags = dict(
                all_greedy=all(t <= 0 for t in temperatures),
                any_top_k=any(k > 0 for k in top_ks),
                any_top_p=any(p < 1 for p in top_ps),
            )
            self._row_params = (requests, tensors, flags)
        _, (temperature, top_k, top_p), flags = self._row_params
        uniforms = [r.rng.random() if r.rng is not None else 0.0 for r in requests]
        uniforms = torch.tensor(uniforms, dtype=torch.float32, device=self._device)
        tokens, logprobs = sample_tokens(logits, temperature, top_k, top_p, uniforms, **flags)
        token_list = tokens.tolist()
        logprob_list = logprobs.tolist()
        keep: list[int] = []
        for i, r in enumerate(requests):
            if r.future.cancelled():
                continue
            token = token_list[i]
            self.stats.tokens_generated += 1
            r.token_ids.append(token)
            r.logprobs.append(logprob_list[i])
            try:
                done = self._finish_reason(r, token)
            except BaseException as error:  # e.g. a stop rule that raised
                fail(r.future, error)
                continue
            if done is None:
                keep.append(i)
                continue
            reason, stop_token, stop_string = done
            self.stats.requests_completed += 1
            resolve(
                r.future,
                Completion(
                    token_ids=r.token_ids,
                    logprobs=r.logprobs,
                    finish_reason=reason,
                    stop_token_id=stop_token,
                    stop_string=stop_string,
                ),
            )
        return tokens, keep

    def _finish_reason(self, r: _Request, token: int) -> tuple[str, int | None, str | None] | None:
        if token in r.stop_ids:
            return "stop_token", token, None
        if r.needs_text:
            before = len(r.text)
            self._extend_text(r)
            if len(r.text) > before:
                for s in r.params.stop_strings:
                    if s and r.text.find(s, max(0, before - len(s) + 1)) >= 0:
                        return "stop_string", None, s
                if r.stop_predicate is not None and r.stop_predicate(r.text):
                    return "stop_rule", None, None
        if len(r.token_ids) >= r.max_new:
            return "length", None, None
        return None

    def _decode(self, ids: list[int]) -> str:
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=False)
        return self._tokenizer.decode(ids, skip_special_tokens=False)

    def _extend_text(self, r: _Request) -> None:
        """Bring `r.text` up to date with `r.token_ids`, withholding an incomplete character."""
        ids = r.token_ids
        prefix = self._decode(ids[r.prefix_offset : r.read_offset]) if r.read_offset > r.prefix_offset else ""
        full = self._decode(ids[r.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            r.text += full[len(prefix) :]
            r.prefix_offset = r.read_offset
            r.read_offset = len(ids)
