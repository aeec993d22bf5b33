"""Group-relative advantages: plain functions of (rewards, group ids).

GRPO and LoGo-GRPO differ only in which groups they build (paper, section 4): GRPO groups the
n rollouts of one conversation; LoGo-GRPO groups the n rollouts of one *session and role*
(global groups) plus the m reruns of one session from one restored memory state (local
groups). Both then normalise each reward against its own group:

    A_i = (R_i - mean_g) / (std_g + eps)        (GRPO; ``scale_by_std=True``)
    A_i =  R_i - mean_g                         (Dr. GRPO; ``scale_by_std=False``)

where ``g`` is the group of sample ``i``, ``mean_g`` the mean reward of that group and
``std_g`` its *population* standard deviation (``ddof=0``: divide by the group size n, not
n - 1). A group whose rewards are all identical (which includes every group of one sample)
carries no learning signal; its samples get advantage exactly 0 and the group is counted in
``num_zero_variance_groups``, a health metric worth logging (the paper's caveat about greedy
rerollouts shows up there as a high count).

Group ids are any hashable values. :func:`make_group_id` builds ids that always include the
role, so extractor and manager samples can never share a group, and
:func:`assert_roles_not_mixed` checks a batch for that mistake.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Literal, NamedTuple, Sequence

import numpy as np

__all__ = [
    "GroupAdvantages",
    "group_advantages",
    "GroupId",
    "make_group_id",
    "assert_roles_not_mixed",
]

# Role names in the order of their integer codes; the same order as the env's ``role``
# observation (0 = extractor, 1 = manager).
ROLE_NAMES = ("extractor", "manager")


@dataclass(frozen=True)
class GroupAdvantages:
    """The result of :func:`group_advantages`."""

    advantages: np.ndarray
    """float64 array, one advantage per sample, in the order of the input rewards."""
    num_groups: int
    """How many distinct group ids the batch holds."""
    num_zero_variance_groups: int
    """How many of those groups have identical rewards (singleton groups included)."""
    group_sizes: dict[Hashable, int]
    """Group id -> number of samples, in order of first appearance."""


def group_advantages(
    rewards: Sequence[float] | np.ndarray,
    group_ids: Sequence[Hashable],
    *,
    scale_by_std: bool = True,
    eps: float = 1e-6,
) -> GroupAdvantages:
    """Normalise each reward within its group.

    ``A_i = (R_i - mean_g) / (std_g + eps)`` with the population std of group ``g``, or
    ``A_i = R_i - mean_g`` when ``scale_by_std=False`` (Dr. GRPO: no std division, so groups
    with a small spread are not blown up). Groups whose rewards are all identical get
    ``A_i = 0`` exactly (not merely ~0 after rounding) and are counted.

    Samples are matched to groups by equality of their ids; the order of samples is free
    (permuting the inputs permutes the advantages the same way).

    Raises ``ValueError`` for rewards that are not a flat finite sequence, a length mismatch
    between rewards and group ids, or a negative ``eps``.
    """
    r = np.asarray(rewards, dtype=np.float64)
    if r.ndim != 1:
        raise ValueError(f"rewards must be one-dimensional, got shape {r.shape}")
    if len(group_ids) != len(r):
        raise ValueError(f"got {len(r)} rewards but {len(group_ids)} group ids")
    if not np.all(np.isfinite(r)):
        bad = np.flatnonzero(~np.isfinite(r))[:5].tolist()
        raise ValueError(f"rewards must be finite; non-finite values at indices {bad}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")

    members: dict[Hashable, list[int]] = {}
    for i, gid in enumerate(group_ids):
        members.setdefault(gid, []).append(i)

    advantages = np.zeros_like(r)
    num_zero_variance = 0
    for idx in members.values():
        group = r[idx]
        if group.max() == group.min():  # identical rewards: no signal, exactly 0
            num_zero_variance += 1
            continue
        centered = group - group.mean()
        advantages[idx] = centered / (group.std() + eps) if scale_by_std else centered

    return GroupAdvantages(
        advantages=advantages,
        num_groups=len(members),
        num_zero_variance_groups=num_zero_variance,
        group_sizes={gid: len(idx) for gid, idx in members.items()},
    )


class GroupId(NamedTuple):
    """A readable, hashable group id: which kind of group, for which role, and a key.

    ``key`` holds the caller's parts, for example ``(conversation, session)`` for a global
    group or ``(conversation, session, source_rollout)`` for a local one.
    """

    kind: Literal["global", "local"]
    role: str
    key: tuple[Hashable, ...]


def _role_name(role: int | str) -> str:
    """Map a role code (0/1) or name to its name, so ``0`` and ``"extractor"`` agree."""
    if isinstance(role, (int, np.integer)) and not isinstance(role, bool):
        if 0 <= role < len(ROLE_NAMES):
            return ROLE_NAMES[int(role)]
    elif isinstance(role, str) and role in ROLE_NAMES:
        return role
    raise ValueError(f"unknown role {role!r}; expected one of {ROLE_NAMES} or 0..{len(ROLE_NAMES) - 1}")


def make_group_id(kind: Literal["global", "local"], role: int | str, *parts: Hashable) -> GroupId:
    """Build a group id that includes the role, so groups never mix roles.

    >>> make_group_id("global", 1, "conv-43", 5)
    GroupId(kind='global', role='manager', key=('conv-43', 5))

    A global and a local group with the same parts are different groups.
    """
    if kind not in ("global", "local"):
        raise ValueError(f"kind must be 'global' or 'local', got {kind!r}")
    for part in parts:
        hash(part)  # fail here, with the offending part in the traceback, not in a dict later
    return GroupId(kind, _role_name(role), tuple(parts))


def assert_roles_not_mixed(group_ids: Sequence[Hashable], roles: Sequence[int | str]) -> None:
    """Raise ``ValueError`` if any group holds samples of two roles.

    ``roles[i]`` is the role of sample ``i`` (code or name). For ids built by
    :func:`make_group_id` the role stored in the id must also match the sample's role.
    """
    if len(group_ids) != len(roles):
        raise ValueError(f"got {len(group_ids)} group ids but {len(roles)} roles")
    role_of_group: dict[Hashable, str] = {}
    for i, (gid, role) in enumerate(zip(group_ids, roles)):
        name = _role_name(role)
        if isinstance(gid, GroupId) and gid.role != name:
            raise ValueError(f"sample {i} has role {name!r} but its group id says {gid.role!r}: {gid}")
        seen = role_of_group.setdefault(gid, name)
        if seen != name:
            raise ValueError(f"group {gid!r} mixes roles {seen!r} and {name!r} (sample {i})")
