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

# The built-in tasks (the demo's data, model, prompt and config section) by name, as the `cir`
# command registers them.
import cir.tasks  # noqa: E402, F401


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


# The demo at test size, for trainer runs in one process: few problems, a small batch, short
# responses, no held-out evaluation between steps, one thread, no progress bar or plots.
SMALL_DEMO_RUN = [
    "demo.eval_problems=24",
    "demo.train_problems=400",
    "algo.prompts_per_step=4",
    "algo.group_size=4",
    "run.eval_every=0",
    "run.progress=false",
    "run.tensorboard=false",
    "run.plot=false",
    "run.threads=1",
    "sandbox.workers=2",
    "schedule=[]",
    "rollout.max_response_tokens=96",
]


def save_warm_demo_model(out, *, num_heads: int, steps: int, batch_size: int, lr: float, tool_share: float):
    """Build the demo's tiny model (seed 0), warm-start it on mixed traces (`tool_share` of them
    call the interpreter) and save it, with its tokenizer, as a Hugging Face folder at `out`."""
    from cir.tasks import demo

    torch.manual_seed(0)
    tok = demo.demo_tokenizer()
    model = demo.demo_model(tok, hidden_size=64, num_layers=2, num_heads=num_heads, seed=0)
    demo.warm_start(
        model,
        tok,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        tool_share={"hard": tool_share, "easy": tool_share},
        easy_share=0.25,
        feedback_template="```output\n{output}\n```\n",
        seed=0,
        exclude=set(),
        progress=False,
    )
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def warm_model_dir(tmp_path_factory):
    """The demo's model after a supervised warm start on mixed traces (half of them call the
    interpreter), saved as a Hugging Face folder that `model.path` can name. About 1.5 min on
    one core; shared by the trainer tests, in one process and under torchrun, so each starts
    from a policy that can already copy an expression into code and the output into its
    answer, but not reliably: groups have reward variance and RL has something to improve."""
    return save_warm_demo_model(
        tmp_path_factory.mktemp("warm_demo_model"), num_heads=4, steps=600, batch_size=64, lr=6e-3, tool_share=0.5
    )


def assert_metrics_match(got: dict, want: dict, keys, *, rel: float = 0.0, abs: float = 0.0, where=None) -> None:
    """`got[key] == want[key]` for every key of `keys`: exactly by default, else within `rel`/`abs`
    (pytest.approx). For the runs that must agree with one process (several ranks, a resumed
    run): a failure names `where` (e.g. the step), the key and both values."""
    for key in keys:
        assert key in got and key in want, (where, key, "missing")
        close = got[key] == want[key] if rel == abs == 0 else got[key] == pytest.approx(want[key], rel=rel, abs=abs)
        assert close, (where, key, got[key], want[key])
