"""Warm start: behaviour cloning of the noisy teacher into the embedded tiny model (or any
local checkpoint).

A randomly initialised tiny model emits no valid JSON, so RL from scratch would see only parse
errors and zero rewards. ``memr2 train`` therefore first teaches it the two action formats by
supervised fine-tuning on what :class:`~agents.baselines.NoisyTeacher` does on synthetic tasks:

1. :func:`teacher_examples` plays the teacher through the real ``MemSession-v0`` env and records
   every ``(role, observation text, action)``: exactly the observations the policy will see.
2. :func:`behaviour_clone` trains the policy with cross-entropy on the assistant tokens only
   (AdamW, short linear warmup then cosine decay, gradient clipping).
3. :func:`warm_start` builds the tiny model (or loads a local checkpoint), measures the
   valid-JSON rate of greedy samples on held-out observations before and after training,
   compares the warmed model's env score with the teacher's and the oracle's on the same tasks,
   and saves a plain ``save_pretrained`` directory plus ``sft_report.json``.

The teacher makes mistakes on purpose (``preset.teacher_noise``): a warmed model that imitates it
scores below the oracle, which leaves room for RL to improve on the teacher.

Command line (``memr2 sft``)::

    memr2 sft --preset tiny --out runs/warm_start
    memr2 sft --model ~/models/my-instruct-lm --lr 2e-5 --device cuda --out runs/warm_mine

torch and transformers are imported inside the functions that need them, so the ``memr2`` CLI can
import this module without them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from agents.policy.models import ModelImportError, resolve_model
from agents.policy.precision import add_dtype_argument, describe_dtype, dtype_name
from agents.presets import add_set_argument, preset_from_args

__all__ = [
    "Example",
    "sft_horizon",
    "teacher_examples",
    "split_reply",
    "sft_loss",
    "behaviour_clone",
    "valid_json_rate",
    "agent_final_score",
    "warm_start",
    "add_arguments",
    "run",
    "MIN_SFT_HORIZON",
    "PRETRAINED_LR",
    "REPORT_NAME",
    "WarmStartError",
]

MIN_SFT_HORIZON = 8
"""Fewest sessions per teacher episode, so that even CI presets with 2- or 3-session curricula get
manager observations with non-empty candidate lists (memories from earlier sessions)."""

REPORT_NAME = "sft_report.json"
"""The report file written next to the warmed model."""


class Example(NamedTuple):
    """One behaviour-cloning example: the teacher's ``action`` for an observation."""

    role: int
    text: str
    action: str


class WarmStartError(ValueError):
    """A warm start that cannot begin: the ``model_path`` checkpoint does not load as a policy."""


# ------------------------------------------------------------------------------------ data


def sft_horizon(preset) -> int:
    """Sessions per teacher episode for the warm-start data of ``preset``.

    ``preset.sft_horizon`` when set (at least :data:`MIN_SFT_HORIZON`). Otherwise the longest
    horizon of the curriculum: the warmed model then has seen manager prompts with as many
    candidate memories as it will meet in the last stage. The tiny preset sets 8 sessions over
    384 conversations instead of 32 sessions over 24: with few conversations the tiny model
    memorises each conversation's names and values instead of reading them from the prompt
    (see docs/training.md, "Warm start").
    """
    horizon = preset.sft_horizon or max(stage.horizon for stage in preset.stages)
    return max(MIN_SFT_HORIZON, int(horizon))


def teacher_examples(preset, task_seeds: Sequence[int], *, horizon: int, noise: float, seed: int) -> list[Example]:
    """Play the noisy teacher on every synthetic task and record each decision.

    Each task ``i`` of ``task_seeds`` is played once from ``reset(options={"task": i})`` in the
    env that :func:`agents.presets.make_env_fn` builds for ``preset`` and ``horizon``. Every step
    yields one :class:`Example` with the observation's role and text and the action string the
    teacher sent. The teacher is a deterministic function of what it sees and of ``seed``, and
    the synthetic tasks are fixed by their seeds, so the same arguments give the same list.

    Args:
        preset: a :class:`agents.presets.TrainPreset` (slices, turns per session...).
        task_seeds: synthetic task seeds to play.
        horizon: sessions per episode.
        noise: the teacher's mistake rate (usually ``preset.teacher_noise``).
        seed: the teacher's seed (which mistakes it makes).
    """
    from agents.baselines import NoisyTeacher
    from agents.presets import make_env_fn

    teacher = NoisyTeacher(noise=noise, seed=seed)
    env = make_env_fn(preset, horizon, list(task_seeds))()
    examples: list[Example] = []
    try:
        for task in range(len(task_seeds)):
            obs, info = env.reset(options={"task": task})
            done = False
            while not done:
                action = teacher.act(obs, info)
                examples.append(Example(int(obs["role"]), obs["text"], action))
                obs, _, terminated, truncated, info = env.step(action)
                done = terminated or truncated
    finally:
        env.close()
    return examples


def _probe_examples(examples: Sequence[Example], per_role: int, seed: int) -> list[Example]:
    """A seeded subset of at most ``per_role`` examples of each role, in a stable order."""
    rng = np.random.default_rng([seed, 7919])
    chosen: list[Example] = []
    for role in (0, 1):
        pool = [e for e in examples if e.role == role]
        if len(pool) > per_role:
            keep = sorted(rng.choice(len(pool), per_role, replace=False))
            pool = [pool[i] for i in keep]
        chosen.extend(pool)
    return chosen


# ------------------------------------------------------------------------------- training


def split_reply(ids: Sequence[int], mask: Sequence[int]) -> tuple[list[int], list[int]]:
    """The prompt and the learned reply of a training example.

    Args:
        ids, mask: a pair from :meth:`agents.policy.SharedPolicy.training_example`; ``mask`` is
            1 on the tokens to learn (the assistant reply and its stop token), one run of ones.

    Returns:
        ``(prompt, reply)``: the ids before the first masked token and the masked ids. Tokens
        after the reply (the template's end of turn) are dropped: a causal model's predictions of
        the reply do not depend on them.

    Raises:
        ValueError: ``ids`` and ``mask`` differ in length, nothing precedes the reply, or the
            ones of ``mask`` are not one contiguous run.
    """
    if len(ids) != len(mask):
        raise ValueError(f"{len(ids)} ids but {len(mask)} mask entries")
    on = [i for i, m in enumerate(mask) if m]
    if on and on[-1] - on[0] + 1 != len(on):
        raise ValueError("the mask marks more than one run of reply tokens")
    start = on[0] if on else len(ids)
    if start == 0:
        raise ValueError("the reply starts at the first token; there is no prompt to condition on")
    return list(ids[:start]), list(ids[start : start + len(on)])


def sft_loss(policy, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]):
    """Mean next-token cross-entropy of the replies given their prompts, over a batch.

    Every reply token of the batch has the same weight (a token mean, not a mean of per-row
    means). The log-probs come from :meth:`agents.policy.SharedPolicy.logprobs_of` at
    temperature 1: the same forward pass the RL update uses, which projects only the reply
    positions to the vocabulary. Projecting every prompt position as well, as a plain
    ``model(...).logits`` would, gives the same loss at several times the memory for a large
    vocabulary (``benchmarks/update_memory.py --full-logits``).

    Args:
        policy: a :class:`~agents.policy.SharedPolicy`.
        pairs: ``(prompt ids, reply ids)`` per row (:func:`split_reply`).

    Returns:
        A scalar tensor with gradients.
    """
    import torch

    logprobs = policy.logprobs_of([p for p, _ in pairs], [r for _, r in pairs], temperature=1.0)
    return -torch.cat(logprobs).mean()


def _batch_order(lengths: Sequence[int], batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """Indices of the examples in each of ``steps`` batches: seeded and length-grouped.

    Epochs walk through a fresh permutation of the data. Each window of 8 batches of that
    permutation is sorted by length and cut into batches, and those batches are shuffled, so a
    batch holds rows of similar length (less padding) while the data order stays random.
    """
    n = len(lengths)
    if n == 0:
        raise ValueError("no training examples")
    batch_size = min(batch_size, n)
    rng = np.random.default_rng([seed, 104729])
    batches: list[list[int]] = []
    while len(batches) < steps:
        perm = rng.permutation(n)
        window = 8 * batch_size
        for start in range(0, n - batch_size + 1, window):
            chunk = sorted(perm[start : start + window].tolist(), key=lambda i: lengths[i])
            group = [chunk[i : i + batch_size] for i in range(0, len(chunk) - batch_size + 1, batch_size)]
            batches.extend(group[j] for j in rng.permutation(len(group)))
    return batches[:steps]


def _lr_factor(step: int, steps: int, warmup: int, floor: float = 0.1) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay from 1 to ``floor``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def behaviour_clone(
    policy,
    examples: Sequence[Example],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int = 0,
    progress: bool = True,
    weight_decay: float = 0.01,
    warmup: int | None = None,
    max_grad_norm: float = 1.0,
    gradient_checkpointing: bool = False,
    callback: Callable[[int, dict], None] | None = None,
) -> dict[str, Any]:
    """Supervised fine-tuning of ``policy`` on the teacher's actions (in place).

    Each example becomes ``policy.training_example(role, text, action)``: the prompt exactly as
    the policy renders it for generation, followed by the action and the stop token; only the
    latter are learned (:func:`sft_loss`). Batches are drawn by :func:`_batch_order` from
    ``seed`` (rows of similar length together) and trained with AdamW
    (:func:`agents.rl.optim.adamw`: float32 master weights for a half-precision model), a linear
    warmup (default: 5% of the steps, at most 50) followed by a cosine decay to a tenth of
    ``lr``, and gradient clipping. ``gradient_checkpointing`` turns activation checkpointing on
    for good (it acts in training mode only; the `small` preset's ``gradient_checkpointing``):
    on SmolLM2 it cuts a batch's peak memory about 2.6x and was no slower on this project's
    CPUs (``benchmarks/update_memory.py``).
    ``callback(step, history)``, if given, runs after every optimizer step (``step`` counts from
    1); it may evaluate the model, which is put back in training mode afterwards.

    Returns:
        ``{"loss": [per step], "lr": [per step], "steps", "examples", "trained_tokens",
        "wall_s"}``.
    """
    import torch

    from agents.rl.optim import adamw

    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rows = [policy.training_example(e.role, e.text, e.action) for e in examples]
    pairs = [split_reply(ids, mask) for ids, mask in rows]
    model = policy.model
    warmup = max(1, min(50, steps // 20)) if warmup is None else max(1, warmup)
    if gradient_checkpointing:
        from agents.rl.update import enable_checkpointing

        enable_checkpointing(model)
    optimizer = adamw(model.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, steps, warmup))
    history: dict[str, Any] = {"loss": [], "lr": [], "steps": steps, "examples": len(rows), "trained_tokens": 0}
    bar = None
    if progress and steps:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="warm start (behaviour cloning)", unit="step")
    start = time.perf_counter()
    smoothed = None
    was_training = model.training
    model.train()
    try:
        for batch in _batch_order([len(ids) for ids, _ in rows], batch_size, steps, seed):
            loss = sft_loss(policy, [pairs[i] for i in batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            history["lr"].append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
            value = float(loss.detach())
            history["loss"].append(value)
            history["trained_tokens"] += sum(len(pairs[i][1]) for i in batch)
            smoothed = value if smoothed is None else 0.9 * smoothed + 0.1 * value
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{smoothed:.3f}", lr=f"{history['lr'][-1]:.1e}")
            if callback is not None:
                callback(len(history["loss"]), history)
                model.train()
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    history["wall_s"] = time.perf_counter() - start
    return history


# ----------------------------------------------------------------------------- measuring


def _parses(role: int, text: str) -> bool:
    """Whether ``text`` is a readable action for ``role`` (no ``parse_error`` in the env)."""
    from memenv.actions import parse_facts, parse_operations

    parser = parse_facts if role == 0 else parse_operations
    return parser(text).error is None


def _same_json(text: str, reference: str) -> bool:
    """Whether two action strings hold the same JSON value."""
    try:
        return json.loads(text) == json.loads(reference)
    except (ValueError, TypeError):
        return False


def valid_json_rate(
    policy, probes: Sequence[Example], *, max_new_tokens: int, batch_size: int = 32
) -> dict[str, Any]:
    """Greedy actions of ``policy`` on ``probes``: how often they parse, per role and overall.

    An action is valid when the env's tolerant parser for its role reads it without a
    ``parse_error`` (``parse_facts`` for the extractor, ``parse_operations`` for the manager).
    Also reported: ``exact`` (the JSON equals the teacher's) and ``truncated`` (the action hit
    ``max_new_tokens`` before its stop token), each per role.
    """
    from agents.policy.prompts import ROLES

    valid: dict[int, list[bool]] = {0: [], 1: []}
    exact: dict[int, list[bool]] = {0: [], 1: []}
    truncated: dict[int, list[bool]] = {0: [], 1: []}
    for start in range(0, len(probes), batch_size):
        chunk = probes[start : start + batch_size]
        generations = policy.generate(
            [{"role": e.role, "text": e.text} for e in chunk], temperature=0.0, max_new_tokens=max_new_tokens
        )
        for example, gen in zip(chunk, generations):
            valid[example.role].append(_parses(example.role, gen.text))
            exact[example.role].append(_same_json(gen.text, example.action))
            truncated[example.role].append(gen.finish_reason == "length")

    def rate(values: list[bool]) -> float | None:
        return float(np.mean(values)) if values else None

    everything = valid[0] + valid[1]
    return {
        "valid_json": rate(everything),
        "n": len(everything),
        **{f"valid_json/{ROLES[r]}": rate(valid[r]) for r in (0, 1)},
        **{f"exact/{ROLES[r]}": rate(exact[r]) for r in (0, 1)},
        **{f"truncated/{ROLES[r]}": rate(truncated[r]) for r in (0, 1)},
    }


def agent_final_score(agent, env_fn: Callable, tasks: Sequence[int], *, per_task: bool = False) -> dict[str, Any]:
    """Score a scripted agent exactly as :func:`agents.rl.curriculum.validate` scores a policy.

    One episode per task from ``reset(options={"task": t})``; then the final memory answers
    every question valid at the end of the horizon (``questions_for(mode="final",
    max_questions=None)``). ``f1`` is the mean over tasks of each episode's mean F1; also
    ``penalty``, ``reward`` and ``memory_size``, averaged the same way; with ``per_task``,
    also ``f1_per_task``.
    """
    from agents.baselines import final_memory_score, mean_final_scores
    from agents.commands.evaluate import play_episode

    env = env_fn()
    scores = []
    try:
        for task in tasks:
            play_episode(env, agent, options={"task": int(task)})
            scores.append(final_memory_score(env))
    finally:
        env.close()
    return mean_final_scores(scores, per_task=per_task)


def _length_stats(policy, examples: Sequence[Example], max_new_tokens: int) -> dict[str, Any]:
    """Token lengths (prompt + reply, and the reply with its stop token) per role, and the share
    of teacher actions that ``max_new_tokens`` would cut."""
    from agents.policy.prompts import ROLES

    stats: dict[str, Any] = {}
    for role in (0, 1):
        totals, replies = [], []
        for e in examples:
            if e.role == role:
                ids, mask = policy.training_example(e.role, e.text, e.action)
                totals.append(len(ids))
                replies.append(sum(mask))
        if not replies:
            continue
        name = ROLES[role]
        stats[name] = {
            "examples": len(replies),
            "sequence_p50": float(np.percentile(totals, 50)),
            "sequence_max": int(max(totals)),
            "reply_p50": float(np.percentile(replies, 50)),
            "reply_p90": float(np.percentile(replies, 90)),
            "reply_p99": float(np.percentile(replies, 99)),
            "reply_max": int(max(replies)),
            "reply_over_max_new_tokens": float(np.mean([r > max_new_tokens for r in replies])),
        }
    return stats


# ----------------------------------------------------------------------------- warm start


def warm_start(
    out_dir: str | Path,
    preset,
    *,
    seed: int,
    task_seeds: Sequence[int],
    eval_seeds: Sequence[int],
    progress: bool = True,
    steps: int | None = None,
    probes_per_role: int | None = None,
    horizon: int | None = None,
    device: str = "cpu",
    model_path: str | Path | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    dtype: str | None = None,
) -> dict[str, Any]:
    """Build the tiny model (or load ``model_path``), clone the noisy teacher into it, measure it
    and save it.

    Steps: (1) the teacher plays ``task_seeds`` (the training data) and ``eval_seeds`` (held-out
    probe observations) for :func:`sft_horizon` sessions;
    (2) the tiny model (``preset.tiny_hidden`` x ``preset.tiny_layers``, ``preset.tiny_heads``
    heads, weights seeded by ``seed``) is built in a temporary directory and loaded as a
    :class:`~agents.policy.SharedPolicy`, or, with ``model_path``, that local checkpoint is
    loaded instead (the same code path from there on); (3) the valid-JSON rate of its greedy
    actions on the probes is measured before and after :func:`behaviour_clone` with
    ``preset.sft_steps``, ``preset.sft_batch`` and ``preset.sft_lr`` (or the overrides); (4) the
    warmed policy is validated on ``eval_seeds`` at the first stage's horizon
    (:func:`agents.rl.curriculum.validate`, final-mode F1) next to the teacher, the oracle and an
    agent with no memory, all scored the same way;
    (5) model, tokenizer and ``sft_report.json`` are written atomically to ``out_dir``, which
    loads offline with plain ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained``.

    Args:
        out_dir: the output directory (replaced atomically if it exists).
        preset: a :class:`agents.presets.TrainPreset`.
        seed: model initialisation, teacher mistakes and batch order.
        task_seeds: synthetic tasks for the training data.
        eval_seeds: held-out synthetic tasks for the probes and the env score.
        progress: show tqdm bars.
        steps: override ``preset.sft_steps``.
        probes_per_role: held-out observations per role for the valid-JSON rate (default
            ``preset.sft_probes``).
        horizon: override the teacher's horizon for the training data.
        device: torch device for training.
        model_path: a local ``save_pretrained`` directory (model and tokenizer with a chat
            template) to warm-start instead of building the tiny model; never downloads.
            Rendered with ``preset.prompt_style``, as ``memr2 train`` will render it.
        lr: override ``preset.sft_lr``.
        batch_size: override ``preset.sft_batch``.
        dtype: weight dtype (``auto``, ``float32``, ``bfloat16``; default ``preset.dtype``, see
            :mod:`agents.policy.precision`).

    Returns:
        The report (also saved as ``sft_report.json``).

    Raises:
        WarmStartError: ``model_path`` does not load (no such directory, no ``config.json``, no
            chat template...); raised before any data is built.
        ValueError: ``steps`` is negative, or ``lr`` or ``batch_size`` is not positive.
    """
    import torch

    from agents.baselines import NoisyTeacher, NoMemoryAgent, OracleAgent
    from agents.commands.checkpoint import atomic_write_dir
    from agents.policy import SharedPolicy
    from agents.policy.tiny import build_tiny_model
    from agents.presets import make_env_fn
    from agents.rl.curriculum import validate

    started = time.perf_counter()
    steps = preset.sft_steps if steps is None else int(steps)
    lr = preset.sft_lr if lr is None else float(lr)
    batch_size = preset.sft_batch if batch_size is None else int(batch_size)
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    data_horizon = sft_horizon(preset) if horizon is None else int(horizon)
    eval_horizon = preset.stages[0].horizon
    max_new_tokens = preset.max_new_tokens
    dtype = preset.dtype if dtype is None else dtype
    probes_per_role = preset.sft_probes if probes_per_role is None else probes_per_role

    if model_path is not None:
        try:
            policy = SharedPolicy.from_pretrained(model_path, device=device, prompt_style=preset.prompt_style, dtype=dtype)
        except (FileNotFoundError, ValueError) as err:
            raise WarmStartError(f"cannot warm-start {str(model_path)!r}: {err}") from err
    else:
        with tempfile.TemporaryDirectory(prefix="memr2-tiny-") as tmp:
            build_tiny_model(
                tmp, seed=seed, hidden_size=preset.tiny_hidden, num_layers=preset.tiny_layers, num_heads=preset.tiny_heads
            )
            policy = SharedPolicy.from_pretrained(tmp, device=device, prompt_style=preset.prompt_style, dtype=dtype)
    config = policy.model.config

    examples = teacher_examples(preset, task_seeds, horizon=data_horizon, noise=preset.teacher_noise, seed=seed)
    held_out = teacher_examples(preset, eval_seeds, horizon=data_horizon, noise=preset.teacher_noise, seed=seed)
    probes = _probe_examples(held_out, probes_per_role, seed)
    parameters = sum(p.numel() for p in policy.model.parameters())
    lengths = _length_stats(policy, examples, max_new_tokens)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if progress:  # the probes of an untrained model run to the token limit: minutes on a CPU
            print(f"warm start: {len(examples)} teacher examples; valid-JSON probes before training "
                  f"({len(probes)} prompts, up to {max_new_tokens} tokens each) ...", flush=True)
        before = valid_json_rate(policy, probes, max_new_tokens=max_new_tokens)
        history = behaviour_clone(
            policy, examples, steps=steps, batch_size=batch_size, lr=lr, seed=seed, progress=progress,
            gradient_checkpointing=preset.gradient_checkpointing,
        )
        after = valid_json_rate(policy, probes, max_new_tokens=max_new_tokens)

        eval_env_fn = make_env_fn(preset, eval_horizon, list(eval_seeds))
        tasks = range(len(eval_seeds))
        eval_start = time.perf_counter()
        model_score = validate(policy, eval_env_fn, tasks, max_new_tokens=max_new_tokens, seed=seed)
        eval_s = time.perf_counter() - eval_start
    teacher_score = agent_final_score(NoisyTeacher(noise=preset.teacher_noise, seed=seed), eval_env_fn, tasks)
    oracle_score = agent_final_score(OracleAgent(), eval_env_fn, tasks)
    empty_score = agent_final_score(NoMemoryAgent(), eval_env_fn, tasks)

    losses = history["loss"]
    tail = losses[-max(1, len(losses) // 10) :] if losses else []
    report: dict[str, Any] = {
        "seed": seed,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "teacher_noise": preset.teacher_noise,
        "model": {
            "source": "tiny" if model_path is None else str(model_path),
            "model_type": getattr(config, "model_type", None),
            "hidden_size": getattr(config, "hidden_size", None),
            "num_layers": getattr(config, "num_hidden_layers", None),
            "num_heads": getattr(config, "num_attention_heads", None),
            "parameters": parameters,
            "prompt_style": preset.prompt_style,
            "dtype": dtype_name(policy.model.dtype),
        },
        "data": {
            "train_tasks": len(task_seeds),
            "train_horizon": data_horizon,
            "examples": len(examples),
            "examples_by_role": {"extractor": sum(e.role == 0 for e in examples), "manager": sum(e.role == 1 for e in examples)},
            "trained_tokens": history["trained_tokens"],
            "token_lengths": lengths,
        },
        "valid_json_before": before,
        "valid_json_after": after,
        "loss_first": losses[0] if losses else None,
        "loss_last": float(np.mean(tail)) if tail else None,
        "loss": losses,
        "env": {
            "eval_tasks": len(eval_seeds),
            "horizon": eval_horizon,
            "model": model_score,
            "teacher": teacher_score,
            "oracle": oracle_score,
            "no_memory": empty_score,
        },
        "max_new_tokens": max_new_tokens,
        "train_s": history["wall_s"],
        "env_eval_s": eval_s,
    }
    report["wall_s"] = time.perf_counter() - started
    with atomic_write_dir(out_dir) as tmp:
        policy.model.save_pretrained(tmp, safe_serialization=True)
        policy.tokenizer.save_pretrained(tmp)
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2), encoding="utf-8")
    return report


# ------------------------------------------------------------------------------------- CLI


def _sft_presets() -> list[str]:
    """Presets that warm-start a model of their own (``sft_steps > 0``): the tiny model, or the
    known pretrained model the preset names."""
    from agents.presets import PRESETS

    return sorted(name for name, preset in PRESETS.items() if preset.sft_steps > 0)


PRETRAINED_LR = 2e-5
"""Default behaviour-cloning learning rate of ``memr2 sft --model PATH``. The presets' ``sft_lr``
(2e-3) is for the tiny model trained from scratch and would wreck a pretrained checkpoint;
2e-5 is TRL's ``SFTConfig`` default for fine-tuning one."""


MAX_SFT_TASKS = 700_000
"""Most teacher conversations ``memr2 sft --tasks`` takes: the warm-start task seeds of run seed
``s`` start at ``1,000,000 * (s + 1) + 300,000``, so more would reach the next run seed's training
conversations."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``memr2 sft``."""
    from agents.presets import PRESETS

    p.add_argument(
        "--preset", choices=sorted(PRESETS), default="tiny",
        help="run size: data, batch, steps, prompt style (default: tiny; without --model one of "
        + ", ".join(_sft_presets()) + ")",
    )
    p.add_argument("--out", type=Path, required=True, help="directory for the warmed model and sft_report.json")
    p.add_argument(
        "--model", default=None,
        help="local HF checkpoint directory (model + tokenizer with a chat template) or a known model name "
        "(memr2 models list) to warm-start instead of the preset's model; never downloads",
    )
    add_dtype_argument(p)
    p.add_argument("--seed", type=int, default=0, help="seed for tasks, teacher, model and batches (default: 0)")
    p.add_argument("--steps", type=int, default=None, help="behaviour-cloning steps (default: the preset's sft_steps)")
    p.add_argument(
        "--lr", type=float, default=None,
        help=f"peak learning rate (default: the preset's sft_lr for the tiny model, {PRETRAINED_LR:g} with --model)",
    )
    p.add_argument("--batch-size", type=int, default=None, help="examples per step (default: the preset's sft_batch)")
    p.add_argument(
        "--tasks", type=int, default=None,
        help="synthetic conversations the teacher plays for the training data (default: the preset's "
        f"sft_tasks; at most {MAX_SFT_TASKS:,}); give longer runs more, so the model sees each example about once",
    )
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    add_set_argument(p)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def format_report(report: dict[str, Any]) -> str:
    """A short human-readable table of a warm-start report."""

    def pct(value: float | None) -> str:
        return "   -  " if value is None else f"{value:6.1%}"

    before, after, env = report["valid_json_before"], report["valid_json_after"], report["env"]
    model = report["model"]
    lines = [
        f"model: {model['source']} ({model['parameters'] / 1e6:.2f} M parameters, {model.get('dtype', 'float32')}, {model['prompt_style']} prompts)",
        f"warm start: {report['steps']} steps, batch {report['batch_size']}, lr {report['lr']:g}, "
        f"{report['data']['examples']} teacher examples, {report['wall_s']:.0f} s "
        f"(training {report['train_s']:.0f} s)",
        f"loss {report['loss_first']:.3f} -> {report['loss_last']:.3f}" if report["loss_first"] is not None else "loss -",
        "",
        f"{'valid JSON':<12}{'before':>8}{'after':>8}",
    ]
    for key, name in (("valid_json/extractor", "extractor"), ("valid_json/manager", "manager"), ("valid_json", "all")):
        lines.append(f"{name:<12}{pct(before[key]):>8}{pct(after[key]):>8}")
    lines += [
        f"{'exact':<12}{'':>8}{pct(after['exact/extractor']):>8} extractor, {pct(after['exact/manager']).strip()} manager",
        "",
        f"env (final-mode F1, {env['eval_tasks']} tasks, horizon {env['horizon']})",
    ]
    for name in ("model", "teacher", "oracle", "no_memory"):
        score = env[name]
        lines.append(f"  {name:<10} F1 {score['f1']:.3f}   memory {score['memory_size']:5.1f}   penalty {score['penalty']:.3f}")
    if "parse_error_rate" in env["model"]:
        lines.append(f"  model parse errors in the env: {env['model']['parse_error_rate']:.1%}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """``memr2 sft``: warm-start the tiny model (or ``--model PATH``) for a preset and print the report."""
    from agents.presets import task_seeds

    preset = preset_from_args(args, "sft")
    explicit_model = args.model is not None
    try:
        model_path = resolve_model(args.model) if explicit_model else (resolve_model(preset.model) if preset.model else None)
        print(describe_dtype(args.dtype or preset.dtype, args.device))
    except (ModelImportError, ValueError) as err:
        raise SystemExit(f"memr2 sft: {err}") from err
    if args.model is None and preset.sft_steps <= 0:
        raise SystemExit(
            f"memr2 sft: preset {args.preset!r} does not warm-start the tiny model; pass --model PATH "
            f"(your own checkpoint) and --steps, or use one of {', '.join(_sft_presets())}"
        )
    if args.model is not None and args.steps is None and preset.sft_steps <= 0:
        raise SystemExit(f"memr2 sft: preset {args.preset!r} sets no warm-start steps; pass --steps N")
    if args.steps is not None and args.steps < 0:
        raise SystemExit(f"memr2 sft: --steps must be >= 0, got {args.steps}")
    if args.lr is not None and not args.lr > 0:
        raise SystemExit(f"memr2 sft: --lr must be positive, got {args.lr}")
    if args.batch_size is not None and args.batch_size < 1:
        raise SystemExit(f"memr2 sft: --batch-size must be positive, got {args.batch_size}")
    if args.tasks is not None:
        if not 1 <= args.tasks <= MAX_SFT_TASKS:
            raise SystemExit(f"memr2 sft: --tasks must be between 1 and {MAX_SFT_TASKS:,}, got {args.tasks}")
        preset = dataclasses.replace(preset, sft_tasks=args.tasks)
    lr = args.lr
    if lr is None and explicit_model:
        lr = PRETRAINED_LR  # the presets' sft_lr is tuned for the preset's own model
    seeds = task_seeds(args.seed, preset)
    try:
        report = warm_start(
            args.out,
            preset,
            seed=args.seed,
            task_seeds=seeds["sft"],
            eval_seeds=seeds["val"],
            progress=not args.no_progress,
            steps=args.steps,
            device=args.device,
            model_path=model_path,
            lr=lr,
            batch_size=args.batch_size,
            dtype=args.dtype,
        )
    except WarmStartError as err:
        raise SystemExit(f"memr2 sft: {err}") from err
    print(format_report(report))
    print(f"model and report: {Path(args.out)}")
    return 0
