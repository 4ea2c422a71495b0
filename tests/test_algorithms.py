import math

import pytest
import torch

from cir.algorithms import (
    Schedule,
    Stage,
    StageConfig,
    advantage_names,
    compute_advantages,
    groups_to_keep,
    informative_groups,
    register_advantage,
)

# Two groups of 4 (prompt 0 and prompt 7) and one of 1 (prompt 3), interleaved on purpose.
REWARDS = torch.tensor([1.0, -1.0, -1.0, 1.0, 1.0, 1.0, -1.0, 1.0, 1.0])
GROUPS = torch.tensor([0, 7, 0, 7, 0, 7, 0, 7, 3])


def test_grpo_hand_computed():
    adv = compute_advantages("grpo", REWARDS, GROUPS, eps=0.0)
    # group 0: rewards [1, -1, 1, -1] -> mean 0, unbiased std sqrt(4/3)
    s0 = math.sqrt(4 / 3)
    # group 7: rewards [-1, 1, 1, 1] -> mean 0.5, deviations [-1.5, .5, .5, .5], var = 3/3 = 1
    expected = [1 / s0, -1.5, -1 / s0, 0.5, 1 / s0, 0.5, -1 / s0, 0.5, 0.0]
    torch.testing.assert_close(adv, torch.tensor(expected), rtol=1e-6, atol=1e-6)


def test_grpo_no_std_and_dr_grpo():
    expected = torch.tensor([1.0, -1.5, -1.0, 0.5, 1.0, 0.5, -1.0, 0.5, 0.0])
    torch.testing.assert_close(compute_advantages("grpo_no_std", REWARDS, GROUPS), expected)
    torch.testing.assert_close(compute_advantages("dr_grpo", REWARDS, GROUPS), expected)


def test_rloo_hand_computed():
    adv = compute_advantages("rloo", REWARDS, GROUPS)
    # group 0, sample 0: 1 - mean(-1, 1, -1) = 1 + 1/3 = 4/3 ; sample 1 (r=-1): -1 - 1/3 = -4/3
    # group 7, sample 1 (r=-1): -1 - 1 = -2 ; r=1: 1 - mean(-1,1,1) = 1 - 1/3 = 2/3
    expected = torch.tensor([4 / 3, -2.0, -4 / 3, 2 / 3, 4 / 3, 2 / 3, -4 / 3, 2 / 3, 0.0])
    torch.testing.assert_close(adv, expected)


def test_reinforce_pp_baseline_token_weighted_whitening():
    rewards = torch.tensor([1.0, -1.0, 1.0, 1.0])
    groups = torch.tensor([0, 0, 1, 1])
    tokens = torch.tensor([3, 1, 2, 2])
    adv = compute_advantages("reinforce_pp_baseline", rewards, groups, num_tokens=tokens, eps=0.0)
    centred = torch.tensor([1.0, -1.0, 0.0, 0.0])  # group means 0 and 1
    w = tokens.double()
    mu = (w * centred.double()).sum() / w.sum()  # (3 - 1) / 8 = 0.25
    var = (w * (centred.double() - mu) ** 2).sum() / w.sum()
    expected = ((centred.double() - mu) / var.sqrt()).float()
    torch.testing.assert_close(adv, expected)
    # Whitened over tokens: the token-weighted mean is 0 and the token-weighted variance 1.
    assert abs(float((w * adv.double()).sum() / w.sum())) < 1e-6
    assert abs(float((w * adv.double() ** 2).sum() / w.sum()) - 1.0) < 1e-5


def test_reinforce_pp_all_equal_rewards_give_zero_not_nan():
    adv = compute_advantages("reinforce_pp_baseline", torch.ones(6), torch.tensor([0, 0, 0, 1, 1, 1]))
    assert torch.isfinite(adv).all() and (adv == 0).all()


def test_unknown_estimator_and_registration():
    with pytest.raises(KeyError, match="unknown advantage estimator 'nope'"):
        compute_advantages("nope", REWARDS, GROUPS)

    @register_advantage("test_raw_reward")
    def raw(rewards, group_ids, *, num_tokens=None, eps=1e-6):
        return rewards

    assert "test_raw_reward" in advantage_names()
    torch.testing.assert_close(compute_advantages("test_raw_reward", REWARDS, GROUPS), REWARDS)
    with pytest.raises(ValueError, match="already registered"):
        register_advantage("test_raw_reward")(raw)


def test_informative_groups():
    keep = informative_groups(torch.tensor([1.0, 1.0, -1.0, -1.0, 1.0, -1.0, 0.5]), torch.tensor([0, 0, 1, 1, 2, 2, 9]))
    assert keep.tolist() == [False, False, False, False, True, True, False]


def test_groups_to_keep_by_hand():
    # rank 0 found 3 then 1 informative groups, rank 1 found 2 then 4; the step wants 6.
    counts = [[3, 1], [2, 4]]
    assert groups_to_keep(counts, 6, rank=0) == ([3, 1], [0, 5])
    assert groups_to_keep(counts, 6, rank=1) == ([2, 0], [3, 6])
    assert groups_to_keep([[5, 5]], 6, rank=0) == ([5, 1], [0, 5])  # one process: the first 6 in order
    assert groups_to_keep(counts, 100, rank=1) == ([2, 4], [3, 6])  # too few anywhere: keep them all


@pytest.mark.parametrize("seed", range(20))
def test_groups_to_keep_selects_what_one_process_would(seed):
    """Ranks own contiguous shards of each round's problems; the groups they keep together are
    exactly the first `wanted` informative groups in (round, position) order, each at the index
    one process gives it."""
    gen = torch.Generator().manual_seed(seed)
    world = int(torch.randint(1, 5, (1,), generator=gen))
    rounds, problems = int(torch.randint(1, 4, (1,), generator=gen)), int(torch.randint(1, 12, (1,), generator=gen))
    wanted = int(torch.randint(0, rounds * problems + 2, (1,), generator=gen))
    informative = torch.rand(rounds, problems, generator=gen) < 0.5
    everyone = [(r, p) for r in range(rounds) for p in range(problems) if informative[r, p]]
    expected = {group: index for index, group in enumerate(everyone[:wanted])}
    bounds = [(k * problems // world, (k + 1) * problems // world) for k in range(world)]
    found = [[[p for p in range(a, b) if informative[r, p]] for r in range(rounds)] for a, b in bounds]
    counts = [[len(per_round) for per_round in mine] for mine in found]
    chosen = {}
    for k in range(world):
        keep, first = groups_to_keep(counts, wanted, rank=k)
        for r in range(rounds):
            for i, p in enumerate(found[k][r][: keep[r]]):
                chosen[(r, p)] = first[r] + i
    assert chosen == expected


def test_schedule_stages():
    sched = Schedule.from_config(
        [
            StageConfig(step=0, tool_budget=1, max_response_tokens=2048),
            StageConfig(step=50, tool_budget=2),
            StageConfig(step=120, tool_budget=4, max_response_tokens=4096),
        ],
        default_budget=9,
        default_tokens=9,
    )
    assert sched.at(0) == Stage(0, 1, 2048)
    assert sched.at(49) == Stage(0, 1, 2048)
    assert sched.at(50) == Stage(50, 2, 2048)  # length carries over
    assert sched.at(119).tool_budget == 2
    assert sched.at(10_000) == Stage(120, 4, 4096)
    assert Schedule.from_config([], 2, 1024).at(7) == Stage(0, 2, 1024)
    with pytest.raises(ValueError, match="start at step 0"):
        Schedule([Stage(5, 1, 10)])
    with pytest.raises(ValueError, match="tool_budget must be >= 0"):
        StageConfig(step=0, tool_budget=-1)
