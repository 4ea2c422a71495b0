"""The code-integrated rollout: prompts -> `Trajectory` objects, token-exact.

The loop: generate, stop at a python block's closing fence, run the block in the sandbox,
append its output as an output block, go on.

Token exactness. The model's tokens enter a `Trajectory` exactly as the engine sampled them
(with the sampler's log-probs and loss_mask 1); the feedback is tokenized alone and appended
with loss_mask 0 and log-prob 0. Nothing is ever decoded and re-tokenized: decoding is used
only to *find* the fence and to *extract* the code to run.

Fences that share a token with more text. Generation stops on the first token after which
the segment's text holds an opening ```` ```python ```` (or ```` ```py ````) line followed by a
line that starts with ```` ``` ```` (indented by at most three spaces). With a byte-level BPE
that token may also carry a newline or more text: in Qwen's vocabulary the fence's last
backtick comes as ``"`\\n"``, ``"`\\n\\n"``, ``"`.\\n"`` or ``"`s"``, a whole fence as
``" ```\\n"``. That token is kept exactly as sampled, extra text included: the extra text
stays in the response *before* the output block.
The feedback starts with ``"\\n"`` only when the response does not already end with a newline,
so the output block always starts on its own line.

Faults of the machine. A block the sandbox could not run (its result has status
"sandbox_fault" after the sandbox's own retries, or the call raised `SandboxError`) is
recorded as a tool call with status `cir.trajectory.SANDBOX_FAULT`, nothing is shown to the
model, and that trajectory ends there (finish_reason "sandbox_fault"); the rest of the batch
goes on. The model is never told "Process killed" for what the machine did.

Scheduling. `rollout_async` runs every trajectory as its own coroutine: while one waits on the
sandbox the engine keeps batching the others' decoding steps. `rollout_turn_sync` is the
baseline used by common research code (and by `cir bench rollout`): all trajectories generate
one turn, then all execute, then the next turn, so everyone waits for the slowest at each
turn. Each generate call carries a seed derived from (trajectory seed, turn), so with an
engine whose per-request sampling is seeded both schedules produce the same trajectories.

Modules: `config` (RolloutConfig), `fences` (where a python block closes), `feedback` (the
output block as tokens), `loop` (one trajectory as a state machine and the two schedules),
`stats` (batch numbers for metrics), `seeds` (sampling seeds by position, for training and
evaluation alike).
"""

from cir.rollout.config import OUTPUT_PLACEHOLDER, RolloutConfig
from cir.rollout.feedback import Feedback, build_feedback
from cir.rollout.fences import PYTHON_BLOCK_CLOSED, CodeBlock, fence_closed, find_code_block
from cir.rollout.loop import rollout, rollout_async, rollout_one, rollout_turn_sync, run_sync
from cir.rollout.seeds import derive_seed, sample_seed
from cir.rollout.stats import rollout_stats

__all__ = [
    "OUTPUT_PLACEHOLDER",
    "PYTHON_BLOCK_CLOSED",
    "CodeBlock",
    "Feedback",
    "RolloutConfig",
    "build_feedback",
    "derive_seed",
    "fence_closed",
    "find_code_block",
    "rollout",
    "rollout_async",
    "rollout_one",
    "rollout_stats",
    "rollout_turn_sync",
    "run_sync",
    "sample_seed",
]
