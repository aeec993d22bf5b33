"""Run presets: every knob of a warm start and a training run, in one frozen dataclass.

``memr2 sft`` and ``memr2 train`` both read :data:`PRESETS`; so do the benchmarks. A preset is a
short list of overrides of :class:`TrainPreset`'s defaults (the paper's settings). The task seeds
and the environment factory live here too, because both commands must draw the same
train / validation / test / warm-start conversations for a run seed.
"""

from __future__ import annotations

import argparse
import ast
import re
from dataclasses import dataclass, fields, replace

from agents.rl.curriculum import Stage, parse_stages

__all__ = ["TrainPreset", "PRESETS", "task_seeds", "env_kwargs", "make_env_fn", "without_curriculum", "override_preset", "add_set_argument",
           "preset_from_args"]


@dataclass(frozen=True)
class TrainPreset:
    """Every knob of a training run. Presets are short lists of overrides of these defaults."""

    stages: tuple[Stage, ...] = (Stage(8, 10), Stage(16, 5), Stage(32, 5))
    """Curriculum: (horizon, update steps) per stage."""
    n_rollouts: int = 16
    """Global group size: whole-horizon rollouts per conversation."""
    tasks_per_step: int = 1
    """Training conversations per update step."""
    p_local: float = 0.5
    """LoGo: probability that a session gets a local group."""
    m_reruns: int = 4
    """LoGo: reruns per local group."""
    max_questions: int = 64
    """Questions scored on each final memory (global reward)."""
    local_max_questions: int | None = 16
    """Questions scored after a rerun session (local reward; ``None``: every answerable one)."""
    lr: float = 2e-6
    """AdamW learning rate."""
    epochs: int = 2
    """Optimizer steps per batch."""
    micro_batch: int = 16
    """Rows per forward/backward pass."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (same gradients, much less memory)."""
    kl_coef: float = 0.001
    """k3 KL to the stage's reference policy."""
    entropy_coef: float = 0.001
    """Entropy bonus."""
    temperature: float = 1.0
    """Rollout sampling temperature."""
    max_new_tokens: int = 256
    """Most tokens per action."""
    rollout_batch: int | None = None
    """Most prompts the model runs at once in rollouts (None: every environment; see
    :class:`agents.generation.rollout.RolloutEngine`'s ``max_batch``). Lower it when the KV cache of many
    rollouts does not fit in memory."""
    slices_per_session: int = 6
    """Slices per session (paper: 6)."""
    n_train: int = 64
    """Synthetic training conversations."""
    n_val: int = 8
    """Held-out validation conversations."""
    n_test: int = 16
    """Held-out test conversations."""
    val_every: int = 0
    """Validate every this many steps inside a stage (0: only at the end of each stage)."""
    turns_per_session: int | tuple[int, int] | None = None
    """Synthetic turns per session (None: the generator's default)."""
    sft_steps: int = 0
    """Warm-start steps of behaviour cloning for the tiny model."""
    sft_batch: int = 32
    """Warm-start batch size."""
    sft_lr: float = 2e-3
    """Warm-start learning rate."""
    sft_tasks: int = 32
    """Synthetic conversations the teacher plays for the warm-start data."""
    sft_horizon: int | None = None
    """Sessions per warm-start conversation (None: the curriculum's longest horizon, at least 8)."""
    sft_probes: int = 64
    """Held-out observations per role on which the warm start measures its valid-JSON rate
    (greedy, before and after); a pretrained model writes long non-JSON replies before, so
    each probe can cost ``max_new_tokens`` tokens."""
    teacher_noise: float = 0.3
    """Mistake rate of the noisy teacher."""
    tiny_hidden: int = 192
    """Hidden size of the tiny model."""
    tiny_layers: int = 4
    """Layers of the tiny model."""
    tiny_heads: int = 8
    """Attention heads of the tiny model (see :func:`agents.policy.tiny.tiny_config` for why 8)."""
    prompt_style: str = "compact"
    """Role prompts: compact (tiny model) or full (instruct LLMs)."""
    model: str | None = None
    """A known pretrained model (``memr2 models list``) to start from, imported on first use;
    ``None``: build and warm-start the embedded tiny model. ``--model PATH`` overrides it."""
    dtype: str | None = None
    """Weight dtype: ``auto``, ``float32``, ``bfloat16`` (see :mod:`agents.policy.precision`);
    ``None``: float32 on CPU, the checkpoint's own dtype on accelerators. ``--dtype`` overrides."""


PRESETS: dict[str, TrainPreset] = {
    # CI-sized: a couple of minutes end to end.
    "smoke": TrainPreset(
        stages=(Stage(2, 1), Stage(3, 1)), n_rollouts=2, m_reruns=2, max_questions=16, local_max_questions=8,
        lr=1e-4, epochs=1, micro_batch=32, max_new_tokens=96, slices_per_session=2, n_train=4, n_val=1, n_test=2,
        turns_per_session=6, sft_steps=60, sft_batch=16, sft_tasks=4, teacher_noise=0.3,
    ),
    "quick": TrainPreset(
        stages=(Stage(4, 3), Stage(8, 2)), n_rollouts=4, m_reruns=3, max_questions=32, local_max_questions=8,
        lr=5e-5, epochs=2, micro_batch=32, max_new_tokens=128, slices_per_session=3, n_train=16, n_val=2, n_test=4,
        sft_steps=400, sft_batch=32, sft_tasks=16,
    ),
    # The default: the whole curriculum on this 2-core machine well within an hour.
    "tiny": TrainPreset(
        stages=(Stage(8, 3), Stage(16, 2), Stage(32, 1)), n_rollouts=4, m_reruns=4, max_questions=32,
        local_max_questions=16, lr=5e-5, epochs=2, micro_batch=32, max_new_tokens=128, slices_per_session=3,
        n_train=32, n_val=2, n_test=4, sft_steps=400, sft_batch=32, sft_tasks=384, sft_horizon=8,
    ),
    # The paper's settings, for a 7B instruct model on GPUs (use with --model PATH).
    "paper": TrainPreset(prompt_style="full", sft_steps=0),
    # The learning default: SmolLM2-135M-Instruct, sized for a 2-core CPU (docs/results.md).
    "small": TrainPreset(
        model="smollm2-135m-instruct", dtype="auto",
        stages=(Stage(2, 6), Stage(4, 4)), n_rollouts=4, m_reruns=3, p_local=0.5, max_questions=32, local_max_questions=8,
        lr=2e-5, epochs=1, micro_batch=8, gradient_checkpointing=True, kl_coef=0.01, temperature=0.7, max_new_tokens=384,
        slices_per_session=2,
        n_train=64, n_val=8, n_test=16, turns_per_session=(6, 8),
        sft_steps=160, sft_batch=8, sft_lr=1e-4, sft_tasks=128, sft_horizon=4, sft_probes=16,
    ),
}


def without_curriculum(preset: TrainPreset) -> TrainPreset:
    """The same number of steps, all at the last stage's horizon (``memr2 train --no-curriculum``)."""
    return replace(preset, stages=(Stage(preset.stages[-1].horizon, sum(s.steps for s in preset.stages)),))


def override_preset(preset: TrainPreset, assignments: list[str]) -> TrainPreset:
    """``preset`` with ``KEY=VALUE`` overrides of its fields (``memr2 train|sft --set``).

    Values are Python literals (``sft_steps=2``, ``lr=1e-5``, ``dtype='bfloat16'`` or
    ``dtype=bfloat16``, ``turns_per_session=(4,6)``, ``rollout_batch=None``); ``stages`` takes the
    ``--stages`` syntax (``stages=2:1,4:1``). A value must have its field's type (an int where a
    float is expected is fine). Raises ``ValueError`` naming the key or value that is wrong.
    """
    known = {f.name: f for f in fields(TrainPreset)}
    changes: dict = {}
    for item in assignments:
        key, sep, text = item.partition("=")
        key, text = key.strip(), text.strip()
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. sft_steps=2")
        if key not in known:
            raise ValueError(f"--set {item!r}: unknown setting {key!r}; settings: {', '.join(sorted(known))}")
        if key == "stages":
            changes[key] = parse_stages(text)
            continue
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text  # a bare word is a string: dtype=bfloat16
        allowed = {_TYPES[name] for name in re.findall(r"\b(int|float|bool|str|None|tuple)\b", str(known[key].type))}
        if float in allowed and type(value) is int:
            value = float(value)
        if type(value) not in allowed:
            kinds = " or ".join(sorted("None" if t is type(None) else t.__name__ for t in allowed))
            raise ValueError(f"--set {item!r}: {key} must be of type {kinds}, got {value!r}")
        changes[key] = value
    return replace(preset, **changes)


_TYPES = {"int": int, "float": float, "bool": bool, "str": str, "None": type(None), "tuple": tuple}
"""The Python types named in TrainPreset's field annotations."""


def add_set_argument(p: argparse.ArgumentParser) -> None:
    """``--set KEY=VALUE`` (repeatable): override any field of the preset (see ``agents.presets.TrainPreset``)."""
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
        help="override one preset setting, e.g. --set sft_steps=4 --set n_val=2 (repeatable; "
        "names and defaults: agents/presets.py); applied before the other options",
    )


def preset_from_args(args: argparse.Namespace, command: str) -> TrainPreset:
    """The preset named by ``--preset`` with the ``--set`` overrides applied."""
    try:
        return override_preset(PRESETS[args.preset], args.overrides)
    except ValueError as err:
        raise SystemExit(f"memr2 {command}: {err}") from err


def task_seeds(seed: int, preset: TrainPreset) -> dict[str, list[int]]:
    """Disjoint synthetic task seeds for train / validation / test, fixed by the run seed."""
    base = 1_000_000 * (seed + 1)
    return {
        "train": [base + i for i in range(preset.n_train)],
        "val": [base + 100_000 + i for i in range(preset.n_val)],
        "test": [base + 200_000 + i for i in range(preset.n_test)],
        "sft": [base + 300_000 + i for i in range(preset.sft_tasks)],
    }


def env_kwargs(preset: TrainPreset, horizon: int, task_seeds: list[int]) -> dict:
    """The ``MemSession-v0`` arguments of :func:`make_env_fn`: the preset's synthetic conversations
    (turns per session), its slices per session and final-mode scoring, over ``task_seeds``.
    ``agents.trl_adapter.MemoryToolEnv(**env_kwargs(...))`` plays the same tasks through tools."""
    from memenv.data.synthetic import SyntheticConfig

    cfg = SyntheticConfig()
    if preset.turns_per_session:
        cfg = replace(cfg, turns_per_session=preset.turns_per_session)
    return {"horizon": horizon, "task_seeds": list(task_seeds), "synthetic_config": cfg, "reward_mode": "final",
            "slices_per_session": preset.slices_per_session}


def make_env_fn(preset: TrainPreset, horizon: int, task_seeds: list[int], **extra):
    """A factory of training/evaluation envs over the given synthetic tasks (:func:`env_kwargs`;
    ``extra`` are further ``MemSession-v0`` arguments, e.g. ``single_agent=True``)."""
    import gymnasium as gym

    import memenv  # noqa: F401  (registers MemSession-v0)

    kwargs = {**env_kwargs(preset, horizon, task_seeds), **extra}

    def env_fn():
        return gym.make("MemSession-v0", **kwargs)

    return env_fn
