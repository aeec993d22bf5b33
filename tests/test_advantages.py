"""Group-relative advantages: properties (hypothesis) and a case worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agents.rl.advantages import (
    GroupId,
    assert_roles_not_mixed,
    group_advantages,
    make_group_id,
)

# Rewards like the env's (F1 minus a penalty): bounded, with ties likely.
reward = st.floats(-2.0, 2.0, allow_nan=False).map(lambda x: round(x, 3))


@st.composite
def batches(draw, max_groups=5, max_size=8):
    """A batch of (rewards, group ids) with groups of 1..max_size samples, shuffled."""
    sizes = draw(st.lists(st.integers(1, max_size), min_size=1, max_size=max_groups))
    gids = [g for g, n in enumerate(sizes) for _ in range(n)]
    rewards = draw(st.lists(reward, min_size=len(gids), max_size=len(gids)))
    order = draw(st.permutations(range(len(gids))))
    return np.array(rewards)[order], [gids[i] for i in order]


def _per_group(values, gids):
    out = {}
    for v, g in zip(values, gids):
        out.setdefault(g, []).append(v)
    return {g: np.array(v) for g, v in out.items()}


def test_hand_computed():
    # group "a": rewards 1, 2, 3 -> mean 2, population std sqrt(2/3) = 0.816497
    #   advantages -1/0.816497, 0, 1/0.816497 = -1.224745, 0, 1.224745 (eps = 0 here)
    # group "b": rewards 0.5, 0.5 -> zero variance -> 0, 0
    # group "c": single sample -> zero variance -> 0
    rewards = [1.0, 0.5, 2.0, 0.5, 3.0, 7.0]
    gids = ["a", "b", "a", "b", "a", "c"]
    res = group_advantages(rewards, gids, eps=0.0)
    np.testing.assert_allclose(res.advantages, [-1.224745, 0, 0, 0, 1.224745, 0], atol=1e-6)
    assert res.num_groups == 3
    assert res.num_zero_variance_groups == 2
    assert res.group_sizes == {"a": 3, "b": 2, "c": 1}
    # Dr. GRPO: only centred
    drg = group_advantages(rewards, gids, scale_by_std=False)
    np.testing.assert_allclose(drg.advantages, [-1, 0, 0, 0, 1, 0])
    # default eps = 1e-6 slightly shrinks the scaled values
    assert abs(group_advantages(rewards, gids).advantages[4] - 1 / (math.sqrt(2 / 3) + 1e-6)) < 1e-12


@settings(max_examples=60, deadline=None)
@given(batches(), st.booleans())
def test_advantages_sum_to_zero_per_group(batch, scale):
    rewards, gids = batch
    res = group_advantages(rewards, gids, scale_by_std=scale)
    for adv in _per_group(res.advantages, gids).values():
        assert abs(adv.sum()) < 1e-9 * max(1.0, len(adv))


@settings(max_examples=60, deadline=None)
@given(batches(), st.floats(-5.0, 5.0, allow_nan=False), st.booleans())
def test_invariant_to_constant_shift_of_one_group(batch, shift, scale):
    rewards, gids = batch
    target = gids[0]
    shifted = rewards + np.where(np.array(gids) == target, shift, 0.0)
    a = group_advantages(rewards, gids, scale_by_std=scale).advantages
    b = group_advantages(shifted, gids, scale_by_std=scale).advantages
    np.testing.assert_allclose(a, b, atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(batches(), st.floats(0.1, 10.0))
def test_scaling(batch, k):
    rewards, gids = batch
    # std-normalised advantages are invariant to a positive scale (eps = 0 makes it exact) ...
    a = group_advantages(rewards, gids, eps=0.0).advantages
    b = group_advantages(k * rewards, gids, eps=0.0).advantages
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9)
    # ... and Dr. GRPO advantages scale with the rewards, also for a negative factor.
    a = group_advantages(rewards, gids, scale_by_std=False).advantages
    for factor in (k, -k):
        b = group_advantages(factor * rewards, gids, scale_by_std=False).advantages
        np.testing.assert_allclose(b, factor * a, rtol=1e-9, atol=1e-9)


@settings(max_examples=60, deadline=None)
@given(batches(), st.randoms(use_true_random=False))
def test_permuting_samples_permutes_advantages(batch, rnd):
    rewards, gids = batch
    perm = list(range(len(gids)))
    rnd.shuffle(perm)
    a = group_advantages(rewards, gids).advantages
    b = group_advantages(rewards[perm], [gids[i] for i in perm]).advantages
    np.testing.assert_allclose(b, a[perm], rtol=1e-12, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(batches())
def test_zero_variance_groups_counted_and_zero(batch):
    rewards, gids = batch
    res = group_advantages(rewards, gids)
    groups = _per_group(rewards, gids)
    flat = [g for g, r in groups.items() if r.max() == r.min()]
    assert res.num_groups == len(groups)
    assert res.num_zero_variance_groups == len(flat)
    assert res.group_sizes == {g: len(r) for g, r in groups.items()}
    for g in flat:
        assert np.all(res.advantages[np.array(gids) == g] == 0.0)
    # a group with any spread, normalised by its std, has unit population std (up to eps)
    for g, r in groups.items():
        if g not in flat and r.std() > 1e-3:
            assert abs(res.advantages[np.array(gids) == g].std() - 1.0) < 1e-2


def test_bad_inputs():
    with pytest.raises(ValueError, match="group ids"):
        group_advantages([1.0, 2.0], ["a"])
    with pytest.raises(ValueError, match="finite"):
        group_advantages([1.0, float("nan")], ["a", "a"])
    with pytest.raises(ValueError, match="one-dimensional"):
        group_advantages([[1.0, 2.0]], ["a"])
    with pytest.raises(ValueError, match="eps"):
        group_advantages([1.0], ["a"], eps=-1)
    empty = group_advantages([], [])
    assert empty.advantages.shape == (0,) and empty.num_groups == 0


def test_group_ids_include_the_role():
    g0 = make_group_id("global", 0, "conv-43", 5)
    assert g0 == GroupId("global", "extractor", ("conv-43", 5))
    assert make_group_id("global", "extractor", "conv-43", 5) == g0  # code and name agree
    assert make_group_id("global", 1, "conv-43", 5) != g0  # same parts, other role
    assert make_group_id("local", 0, "conv-43", 5) != g0  # same parts, other kind
    assert len({g0, make_group_id("global", 0, "conv-43", 5)}) == 1
    with pytest.raises(ValueError, match="kind"):
        make_group_id("session", 0)
    with pytest.raises(ValueError, match="role"):
        make_group_id("global", 2)
    with pytest.raises(TypeError):
        make_group_id("global", 0, ["unhashable"])


def test_assert_roles_not_mixed():
    ext = make_group_id("global", 0, "c", 1)
    man = make_group_id("global", 1, "c", 1)
    assert_roles_not_mixed([ext, ext, man], [0, "extractor", 1])
    with pytest.raises(ValueError, match="mixes roles"):
        assert_roles_not_mixed(["g", "g"], [0, 1])
    with pytest.raises(ValueError, match="group id says"):
        assert_roles_not_mixed([ext], [1])
    with pytest.raises(ValueError, match="roles"):
        assert_roles_not_mixed([ext], [])
