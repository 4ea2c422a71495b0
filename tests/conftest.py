"""Suite-wide set-up.

Without CUDA the Triton kernels run through Triton's interpreter on CPU tensors; the
variable must be set before triton is first imported.
"""

import os

import pytest

# Subprocesses the tests start (`python -c ...`, console scripts) must import the installed
# package, not the source folder `cir/` of the checkout they may run from (which has neither
# the compiled extension nor `cir.kernels`): don't put the working directory on sys.path.
os.environ["PYTHONSAFEPATH"] = "1"

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # torch missing is a hard error elsewhere; here only decide the mode
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # The suite's models are tiny: one intra-op thread is as fast as two and does not fight
    # the sandbox's worker processes (or other jobs) for the cores.
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
