"""Fused kernels for RL on language models, shipped as `cir.kernels`.

- `linear_logprob`: per-token log-prob (and entropy) of target tokens straight from the last
  hidden states and the LM-head weight, a vocabulary tile at a time, never materialising the
  [tokens, vocab] logits.
- `policy_loss`: the masked clipped policy-gradient loss and its metrics in one pass.

Each has a Triton implementation (CUDA), a plain torch reference (the ground truth in tests),
and a dispatch function that picks Triton on CUDA and the torch path elsewhere; `impl=` forces
either.
"""
