"""Per-token log-probs (and entropies) of a batch's response tokens under a causal LM.

Computed from the decoder's last hidden states and the LM-head weight by
`cir.kernels.linear_logprob` (Triton on CUDA, a bounded-memory chunked path on CPU), so the
[tokens, vocab] logits are never materialised, and only for response positions. Given a
token-separable loss, the same module computes that loss in the LM head's pass instead
(`cir.kernels.linear_loss`: the gradients during the forward).
"""

from __future__ import annotations

import torch

from cir.kernels import linear_logprob, linear_loss
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
    return ResponseLogprobs(model).of(mb, temperature=temperature, with_entropy=with_entropy, impl=impl)


class ResponseLogprobs(torch.nn.Module):
    """A causal LM whose forward returns the log-probs (and entropies) of a micro-batch's
    response tokens, [n] fp32 each; or, given `token_loss` (a `cir.kernels.linear_loss` loss),
    (loss, log-probs, entropies) from the fused pass, the log-probs and entropies detached.

    This is the module the actor calls, and the one FSDP2 wraps as its root: the fused kernel
    reads the LM-head weight, which is whole only inside the sharded module's forward (outside
    it each rank holds a shard). Plain tensors in, so no wrapper has to understand MicroBatch.
    """

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm

    def forward(
        self,
        input_ids,
        attention_mask,
        position_ids,
        hidden_index,
        targets,
        temperature: float,
        with_entropy: bool,
        impl: str,
        token_loss=None,
    ):
        decoder, weight = decoder_and_head(self.lm)
        # A packed row comes with position ids that restart at each sequence and no attention
        # mask: from those restarts `transformers` builds a block-diagonal causal mask (sdpa,
        # eager) or calls flash-attn's varlen kernel (flash_attention_2). It looks for them only
        # when the mask is None and there is no cache, hence both here.
        out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, hidden_index)
        if token_loss is not None:
            return linear_loss(rows, weight, targets, token_loss, temperature=temperature, with_entropy=with_entropy)
        return linear_logprob(rows, weight, targets, temperature=temperature, with_entropy=with_entropy, impl=impl)

    def of(self, mb: MicroBatch, *, temperature: float, with_entropy: bool, impl: str = "auto", token_loss=None):
        return self(
            mb.input_ids,
            mb.attention_mask,
            mb.position_ids,
            mb.hidden_index,
            mb.targets,
            temperature,
            with_entropy,
            impl,
            token_loss,
        )
