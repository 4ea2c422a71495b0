"""Per-token log-probs (and entropies) of a batch's response tokens under a causal LM.

Computed from the decoder's last hidden states and the LM-head weight by
`cir.kernels.linear_logprob` (Triton on CUDA, a bounded-memory chunked path on CPU), so the
[tokens, vocab] logits are never materialised, and only for response positions.
"""

from __future__ import annotations

from cir.kernels import linear_logprob
from cir.training.batch import MicroBatch


def decoder_and_head(model):
    """The decoder stack (returning last hidden states, final norm applied) and the LM-head
    weight of a `transformers` causal LM."""
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"{type(model).__name__} has no output embedding (LM head) to compute log-probs from")
    if getattr(head, "bias", None) is not None:
        raise ValueError(f"{type(model).__name__}: an LM head with a bias is not supported by the fused log-prob path")
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    return decoder, head.weight


def token_logprobs(model, mb: MicroBatch, *, temperature: float, with_entropy: bool, impl: str = "auto"):
    """Log-probs (and entropies) of the response tokens of `mb` under `model`, [n] fp32 each."""
    decoder, weight = decoder_and_head(model)
    out = decoder(input_ids=mb.input_ids, attention_mask=mb.attention_mask, use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, mb.hidden_index)
    return linear_logprob(rows, weight, mb.targets, temperature=temperature, with_entropy=with_entropy, impl=impl)
