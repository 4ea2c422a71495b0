"""The RL math, as pure functions of tensors registered by name.

- `advantages`: estimators (REINFORCE++ with a group baseline, GRPO, RLOO, Dr. GRPO, ...);
- `losses`: policy losses (torch reference + fused kernel) and micro-batch loss weights;
- `sampling`: dynamic sampling (which groups carry a learning signal);
- `schedule`: the progressive interaction budget;
- `config`: the `algo.*` config section.

Each is checked alone against hand-computed values (tests/test_algorithms.py).
"""

from cir.algorithms.advantages import advantage_names, compute_advantages, register_advantage
from cir.algorithms.config import AlgoConfig
from cir.algorithms.losses import (
    compute_policy_loss,
    get_policy_loss,
    micro_batch_weight,
    policy_loss_names,
    register_policy_loss,
)
from cir.algorithms.sampling import groups_to_keep, informative_groups, missing_groups
from cir.algorithms.schedule import Schedule, Stage, StageConfig

__all__ = [
    "AlgoConfig",
    "Schedule",
    "Stage",
    "StageConfig",
    "advantage_names",
    "compute_advantages",
    "compute_policy_loss",
    "get_policy_loss",
    "informative_groups",
    "micro_batch_weight",
    "missing_groups",
    "groups_to_keep",
    "policy_loss_names",
    "register_advantage",
    "register_policy_loss",
]
