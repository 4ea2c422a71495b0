"""The RL math, as pure functions of tensors registered by name.

- `estimators`: advantage estimators (REINFORCE++ with a group baseline, GRPO, RLOO, Dr. GRPO);
- `advantages`: `compute_advantages`, an estimator by name;
- `losses`: policy losses (torch reference + fused kernel) and micro-batch loss weights;
- `registry`: the estimators and losses by name (`register_advantage`, `register_policy_loss`);
- `sampling`: dynamic sampling (which groups carry a learning signal);
- `schedule`: the progressive interaction budget;
- `config`: the `algo.*` config section.

Each is checked alone against hand-computed values (tests/test_algorithms.py).

Every public name is importable from here; each module is imported on first use of one of its
names, so the config (`config`, `schedule`, `registry`) loads without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cir.lazy import lazy_attributes

_LAZY_NAMES: dict[str, str] = {
    "AlgoConfig": "config",
    "PolicyLoss": "registry",
    "Schedule": "schedule",
    "Stage": "schedule",
    "StageConfig": "schedule",
    "advantage_names": "registry",
    "compute_advantages": "advantages",
    "compute_policy_loss": "losses",
    "get_advantage": "registry",
    "get_policy_loss": "registry",
    "groups_to_keep": "sampling",
    "informative_groups": "sampling",
    "micro_batch_weight": "losses",
    "missing_groups": "sampling",
    "policy_loss_names": "registry",
    "register_advantage": "registry",
    "register_policy_loss": "registry",
}

__all__ = [
    "AlgoConfig",
    "PolicyLoss",
    "Schedule",
    "Stage",
    "StageConfig",
    "advantage_names",
    "compute_advantages",
    "compute_policy_loss",
    "get_advantage",
    "get_policy_loss",
    "groups_to_keep",
    "informative_groups",
    "micro_batch_weight",
    "missing_groups",
    "policy_loss_names",
    "register_advantage",
    "register_policy_loss",
]


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY_NAMES)


if TYPE_CHECKING:  # what the lazy names are, for type checkers and editors
    from cir.algorithms.advantages import compute_advantages
    from cir.algorithms.config import AlgoConfig
    from cir.algorithms.losses import compute_policy_loss, micro_batch_weight
    from cir.algorithms.registry import (
        PolicyLoss,
        advantage_names,
        get_advantage,
        get_policy_loss,
        policy_loss_names,
        register_advantage,
        register_policy_loss,
    )
    from cir.algorithms.sampling import groups_to_keep, informative_groups, missing_groups
    from cir.algorithms.schedule import Schedule, Stage, StageConfig
