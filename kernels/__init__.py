"""Fused kernels for RL on language models, shipped as `cir.kernels`.

- `linear_logprob`: per-token log-prob (and entropy) of target tokens straight from the last
  hidden states and the LM-head weight, a vocabulary tile at a time, never materialising the
  [tokens, vocab] logits.
- `policy_loss`: the masked clipped policy-gradient loss and its metrics in one pass.
- `linear_loss`: the LM head, log-softmax and a token-separable loss (the policy loss, token by
  token) in one pass that computes the gradients during the forward (torch; the CPU's default).

Each has a Triton implementation (CUDA), a plain torch reference (the ground truth in tests),
and a dispatch function that picks Triton on CUDA and the torch path elsewhere; `impl=` forces
either.
"""

# This folder is only a package as `cir.kernels`. When the repository root is on sys.path
# (running from a checkout), the name `kernels` resolves here too, and libraries that probe
# for the unrelated PyPI package of that name import it: stay empty and cheap then.
if __name__ == "cir.kernels":
    from .linear_logprob import linear_logprob
    from .linear_loss import linear_loss
    from .policy_loss import policy_loss

    __all__ = ["linear_logprob", "linear_loss", "policy_loss"]
