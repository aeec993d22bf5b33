"""Train a tool-calling model on ``MemSession-v0`` with TRL's ``GRPOTrainer``.

The model keeps the memory through four tools (``add_memory``, ``update_memory``,
``delete_memory``, ``next_turns``) of :class:`agents.trl_adapter.MemoryToolEnv`; the reward is the
env's episode return. Each dataset row names its task (a ``seed``, or with ``--preset`` a task of
that preset's training conversations), so the ``num_generations`` rollouts of a row all face the
same conversation, as GRPO needs.

    # SmolLM2-135M-Instruct on a CPU, the route that learns: a warm start on the noisy teacher's
    # tool calls with TRL's SFTTrainer (examples/trl_sft.py; --episodes 128, the warm start of the
    # documented run, about 54 minutes with bfloat16), then GRPO on 6 of the small preset's
    # conversations, each played 4 times (about 3.5 min a step here: 24 steps take 84 min;
    # docs/third_party.md has the run's curve, trend and held-out table)
    python examples/trl_sft.py --model "$(memr2 models path smollm2-135m-instruct)" --episodes 128 \
        --output-dir runs/trl_sft
    # (--save-steps 1: a checkpoint after every step; after a kill, the same command with --resume goes on)
    # (and --max-steps 48 --resume takes a finished run on to 48 steps, where its reward's rise resolves)
    python examples/trl_grpo.py --model runs/trl_sft --preset small --horizon 2 --rows 6 \
        --num-generations 4 --micro-batch 1 --max-steps 24 --max-completion-length 2048 --max-tool-calls 16 \
        --temperature 0.7 --learning-rate 2e-5 --seed 0 --output-dir runs/trl_grpo --save-steps 1

    # SmolLM2 without a warm start: its own chat template has no tool calling, so use the
    # project's (agents/trl_template.py; a warm start saves it with the model); --start-with-tool-call
    # opens every reply with a call; --threads 1 on a machine whose cores are shared with other jobs.
    # Its rewards hardly ever vary (docs/third_party.md)
    python examples/trl_grpo.py --model "$(memr2 models path smollm2-135m-instruct)" \
        --tool-template --start-with-tool-call --threads 1 --horizon 2 --rows 8 --num-generations 2 \
        --max-steps 30 --max-completion-length 64 --max-tool-calls 3 --temperature 0.7 --learning-rate 1e-5

    # a model whose template supports tool calling (Qwen3, Llama 3.1...), on a GPU
    python examples/trl_grpo.py --model /path/to/local/instruct-model --horizon 4 --max-steps 50

    # no TRL, no model: a scripted tool user plays a few rows through the same adapter
    python examples/trl_grpo.py --dry-run

The device and precision follow the machine (``--dtype auto``: bfloat16 mixed precision on a CPU
with bfloat16 instructions or a GPU that supports it, else float32; weights stay float32; see
``agents.trl_template.precision_settings``). Each step prints one line (reward, share of replies
with a parsed tool call, tool calls and errors, env operations) and appends it to
``OUTPUT_DIR/steps.jsonl``, with the conversation each rollout played, its return and adds, and
the noisy teacher's return on it (a step plays one conversation, and which one moves the step's
reward more than a few updates do; the reward minus the teacher's takes that out). At the end the totals and the reward's
trend (least-squares slope per step with a bootstrap CI, raw and relative to the teacher, and
with ``--rows`` below the steps each conversation's last visit minus its first and its slope
over all its visits) go to
``OUTPUT_DIR/summary.json`` and the curves to ``OUTPUT_DIR/curve.png`` (``--plot OUTPUT_DIR``
redraws them from ``steps.jsonl``). ``--save-steps N`` keeps the latest checkpoint, and
``--resume`` continues a killed run from it.

Nothing is downloaded: ``--model`` must be a local directory, and the Hugging Face hub is put in
offline mode before TRL is imported.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout

from agents.trl_adapter import DEFAULT_PROMPT, MemoryToolEnv, reply_stats  # noqa: E402

_TURN = re.compile(r"^\[(D\d+:\d+)\] ([^:]+): (.*)$")


def scripted_rollout(env: MemoryToolEnv, row: dict) -> float:
    """Play one row the way a model would, through the tools only: store every turn verbatim."""
    text = env.reset(**row)
    while True:
        for line in text.splitlines():
            m = _TURN.match(line)
            if m:
                env.add_memory(text=m.group(3), speaker=m.group(2), dia_id=m.group(1))
        text = env.next_turns()
        if env.done:
            return env.get_reward()


def dry_run(horizon: int, rows: int) -> None:
    make = MemoryToolEnv.factory(horizon=horizon)
    env = make()
    for seed in range(rows):
        row = {"prompt": [{"role": "user", "content": DEFAULT_PROMPT}], "seed": seed}
        reward = scripted_rollout(env, row)
        again = scripted_rollout(make(), row)  # a fresh instance, same row: same task, same reward
        assert reward == again, (reward, again)
        print(f"seed {seed}: reward {reward:.3f}")


def build_trainer(args: argparse.Namespace, *, reward_funcs=(reply_stats,), rows: list[dict] | None = None,
                  env_kwargs: dict | None = None):
    """The ``GRPOTrainer`` for ``args`` and the list that collects every env it makes.

    The reward is the env's (``MemoryToolEnv.get_reward``); ``reward_funcs`` come on top, and the
    default, :func:`agents.trl_adapter.reply_stats`, only logs how many replies held a tool call.
    ``rows`` name the episodes (``seed``, ``task`` or ``state`` columns, one key set for all);
    default: ``{"seed": i}`` for ``i < args.rows``. Each gets the ``DEFAULT_PROMPT`` prompt.
    ``env_kwargs`` go to every ``MemoryToolEnv`` (``MemSession-v0`` settings such as ``bloat_tau``).

    Raises:
        ValueError: TRL's "does not support tool calling" error, with a hint about
            ``--tool-template``, when the model's chat template cannot render tool calls.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not Path(args.model).is_dir():
        raise SystemExit(f"--model must be a local model directory (no downloads): {args.model}")
    from agents.trl_sft import require_trl

    try:
        require_trl()  # environment_factory: TRL >= 1.16
        from datasets import Dataset
        from transformers import AutoTokenizer
        from trl import GRPOConfig, GRPOTrainer
    except ImportError as err:
        raise SystemExit(f"this example needs TRL: {err}") from None
    # TRL turns checkpointing on by default; recent transformers name the field activation_checkpointing
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in GRPOConfig.__dataclass_fields__ else "gradient_checkpointing"
    from agents.trl_template import TOOL_CHAT_TEMPLATE, apply_tool_template, precision_settings, with_tool_template_hint

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if args.tool_template or tokenizer.chat_template == TOOL_CHAT_TEMPLATE:
        saved = tokenizer.chat_template == TOOL_CHAT_TEMPLATE  # a warm start of examples/trl_sft.py saves it
        apply_tool_template(tokenizer)  # (again: the response parser is not saved with the tokenizer)
        print("chat template: the project's ChatML tool-calling template (agents/trl_template.py)"
              + (", saved with the model" if saved else " replaces the model's"))
    precision = precision_settings(args.dtype, args.device)
    print(f"device {'cpu' if precision['use_cpu'] else 'cuda'}, weights float32, bf16 mixed precision {'on' if precision['bf16'] else 'off'}")

    preset_kwargs = preset_env_kwargs(args)
    micro = args.micro_batch or args.num_generations
    if args.num_generations % micro:
        raise SystemExit(f"--micro-batch {micro} must divide --num-generations {args.num_generations}")
    if rows is None:
        rows = [{"task": i} if preset_kwargs else {"seed": i} for i in range(args.rows)]
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": DEFAULT_PROMPT}], **row} for row in rows])
    config = GRPOConfig(
        output_dir=args.output_dir,
        num_generations=args.num_generations,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=args.num_generations // micro,  # one group per optimizer step
        max_completion_length=args.max_completion_length,
        max_tool_calling_iterations=args.max_tool_calls,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type=args.lr_scheduler,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
        **{checkpointing: args.gradient_checkpointing},
        chat_template_kwargs={"start_with_tool_call": True} if args.start_with_tool_call else None,
        logging_steps=1,
        # --save-steps: a checkpoint (model, optimizer, RNG, data position) every N steps, the latest
        # kept, so --resume continues a long run after a kill where it stopped
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        save_total_limit=1,
        report_to="none",
        **precision,
    )
    envs: list[MemoryToolEnv] = []
    settings = {"horizon": args.horizon, "max_questions": args.max_questions, **preset_kwargs, **(env_kwargs or {})}

    def make_env() -> MemoryToolEnv:  # TRL calls it with no arguments; keep each env for the summary
        env = MemoryToolEnv(**settings)
        envs.append(env)
        return env

    try:
        trainer = GRPOTrainer(
            model=args.model,
            processing_class=tokenizer,
            reward_funcs=list(reward_funcs),
            train_dataset=dataset,
            args=config,
            environment_factory=make_env,  # the env owns the reward: get_reward()
        )
    except ValueError as err:
        hinted = with_tool_template_hint(err)
        if hinted is err:
            raise
        raise hinted from err
    trainer.add_callback(make_step_log(envs, Path(args.output_dir) / "steps.jsonl", teacher_baseline(settings)))
    return trainer, envs


def teacher_baseline(settings: dict):
    """``row -> the noisy teacher's mean return on that episode`` in an env with ``settings``
    (:func:`agents.trl_sft.teacher_return`: noise 0.3 as in the warm start's data, 4 draws), cached
    per row. Each step's record carries it, so the reward can be read relative to how hard the
    step's conversation is."""
    from agents.trl_sft import teacher_return

    env, cache = MemoryToolEnv(**settings), {}

    def baseline(row: dict) -> float:
        key = tuple(sorted(row.items()))
        if key not in cache:
            cache[key] = teacher_return(env, row)
        return cache[key]

    return baseline


def preset_env_kwargs(args: argparse.Namespace) -> dict:
    """With ``--preset``: the ``MemSession-v0`` arguments ``memr2 train`` uses for that preset (its
    training conversations, turns and slices per session, final-mode scoring; see
    ``agents.presets.env_kwargs``) at ``--horizon``, with the preset's ``max_questions`` unless
    ``--max-questions`` is given. Without it: ``{}`` (the env's own defaults)."""
    if args.preset is None:
        return {}
    from agents.presets import PRESETS, env_kwargs, task_seeds

    preset = PRESETS[args.preset]
    seeds = task_seeds(args.seed_conversations, preset)["train"]
    if args.rows > len(seeds):
        raise SystemExit(f"--rows {args.rows}: preset {args.preset} has {len(seeds)} training conversations")
    kwargs = env_kwargs(preset, args.horizon, seeds)
    kwargs["max_questions"] = args.max_questions if args.max_questions is not None else preset.max_questions
    return kwargs


# TRL's log key -> our name, for each step's record
_LOG_KEYS = {
    "reward": "reward", "reward_std": "reward_std", "rewards/MemoryToolEnv/mean": "env_reward",
    "tools/call_frequency": "tool_calls_per_rollout", "tools/failure_frequency": "tool_failure_rate",
    "replies/per_rollout": "replies_per_rollout", "replies/with_tool_call": "replies_with_tool_call",
    "completions/mean_length": "completion_tokens", "loss": "loss",
}
_OPS = ("adds", "updates", "deletes", "invalid_ops")


def episode_totals(episodes: list[dict]) -> dict:
    """Tool calls, tool errors and env operations summed over episode summaries (``MemoryToolEnv.history``)."""
    per_episode = [{"episodes": 1, "tool_calls": h["tool_calls"], "tool_errors": h["tool_errors"],
                    "env_operations": {k: h["stats"].get(k, 0) for k in _OPS}, "finished_by_model": h["finished_by_model"]}
                   for h in episodes]
    return {**combine_totals(per_episode), "episode_rewards": [h["reward"] for h in episodes],
            "episode_rows": [h["row"] for h in episodes],
            # each episode's own adds, beside its reward: does the group advantage favour writing more?
            "episode_adds": [e["env_operations"]["adds"] for e in per_episode]}


def combine_totals(records: list[dict]) -> dict:
    """The totals of :func:`episode_totals` over per-step records (or per-episode ones): a whole
    run's from its steps, which survive a resume where the envs' histories do not."""
    calls: Counter = Counter()
    ops: Counter = Counter({k: 0 for k in _OPS})
    for r in records:
        calls.update(r["tool_calls"])
        ops.update(r["env_operations"])
    return {
        "episodes": sum(r["episodes"] for r in records),
        "tool_calls": dict(sorted(calls.items())),
        "tool_errors": sum(r["tool_errors"] for r in records),
        "env_operations": dict(ops),
        "finished_by_model": sum(r["finished_by_model"] for r in records),
    }


def make_step_log(envs: list[MemoryToolEnv], path: Path, baseline=None):
    """The callback that logs each step (a class made here: transformers is imported only when
    training). ``baseline(row)``, if given, is a reference return for the episode ``row`` names
    (:func:`teacher_baseline`)."""
    from transformers import TrainerCallback

    class StepLog(TrainerCallback):
        """After each logged step: that step's TRL figures plus the episodes the envs scored since the
        last step (their rows, returns and, with a baseline, the baseline's return on the same rows),
        printed as one line and appended to ``steps.jsonl`` (a long run can be read while it runs, and
        what it did survives an interruption). A run resumed from a checkpoint keeps the records up to
        the checkpoint's step and appends after them."""

        def __init__(self, envs: list[MemoryToolEnv], path: Path):
            self.envs, self.path, self.seen, self.records = envs, path, {}, []
            self.start = time.perf_counter()

        def on_train_begin(self, args, state, control, **kwargs):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.records = [r for r in read_steps(self.path) if r["step"] <= state.global_step] if state.global_step else []
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records))
            # elapsed time counts on from the checkpoint's last record
            self.start = time.perf_counter() - (self.records[-1]["elapsed_s"] if self.records else 0.0)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "reward" not in logs:
                return
            new = []
            for env in self.envs:
                history = list(env.history)
                new += history[self.seen.get(id(env), 0):]
                self.seen[id(env)] = len(history)
            record = {"step": state.global_step, "elapsed_s": round(time.perf_counter() - self.start, 1),
                      **{ours: logs[key] for key, ours in _LOG_KEYS.items() if key in logs}, **episode_totals(new)}
            if baseline is not None and new:
                record["teacher_rewards"] = [baseline(h["row"]) for h in new]
                record["reward_vs_teacher"] = sum(h["reward"] for h in new) / len(new) - sum(record["teacher_rewards"]) / len(new)
            self.records.append(record)
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            print(
                f"step {record['step']:>3} ({record['elapsed_s']:.0f} s): reward {record['reward']:+.4f} "
                f"(std {record.get('reward_std', float('nan')):.4f}), replies with a tool call "
                f"{record.get('replies_with_tool_call', float('nan')):.0%}, tool calls {sum(record['tool_calls'].values())} "
                f"({record['tool_errors']} failed), env ops {record['env_operations']}",
                flush=True,
            )

    return StepLog(envs, path)


def read_steps(path: Path) -> list[dict]:
    """The per-step records of ``steps.jsonl`` (none if the file does not exist)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def step_log(trainer):
    """The example's callback on ``trainer`` (its ``records``: one dict per step)."""
    return next(cb for cb in trainer.callback_handler.callbacks if type(cb).__name__ == "StepLog")


def summarize(trainer, wall_s: float) -> dict:
    """The run's per-step records and its totals over every scored episode (those of the steps
    before a resume included)."""
    records = step_log(trainer).records
    return {"wall_s": round(wall_s, 1), "steps": records, **combine_totals(records)}


def reward_trend(steps: list[dict], key: str = "reward") -> dict:
    """The least-squares slope of the steps' ``key`` (the mean reward) against the step, with a 95%
    bootstrap CI over steps, and its mean over the first and the second half of the run. With
    ``key="reward"`` and steps that carry ``reward_vs_teacher``, also the same for that
    (``"vs_teacher"``): the reward minus the noisy teacher's on the same conversations, which takes
    out how hard each step's conversation happened to be; and, where steps carry ``episode_rows``
    and a conversation was played at more than one step (``--rows`` smaller than the steps),
    ``"revisits"``: per such conversation, its mean return at its last step minus its first, the
    mean of that over the conversations and a 95% bootstrap CI over them (the same conversation
    before and after the updates between, so how hard it is cancels out), and the slope within
    conversations over all their visits (``revisit_gains``)."""
    import numpy as np

    x = np.array([s["step"] for s in steps], float)
    y = np.array([s[key] for s in steps], float)
    if len(x) < 3:
        return {"steps": len(x)}
    rng = np.random.default_rng(0)
    slopes = []
    for _ in range(2000):
        i = rng.integers(len(x), size=len(x))
        if np.ptp(x[i]) > 0:
            slopes.append(np.polyfit(x[i], y[i], 1)[0])
    half = len(y) // 2
    trend = {"steps": len(x), "slope_per_step": float(np.polyfit(x, y, 1)[0]),
             "slope_ci95": [float(np.percentile(slopes, 2.5)), float(np.percentile(slopes, 97.5))],
             "first_half_reward": float(y[:half].mean()), "second_half_reward": float(y[half:].mean()),
             "steps_with_reward_std": int(sum(s.get("reward_std", 0) > 0 for s in steps))}
    if key == "reward" and all("reward_vs_teacher" in s for s in steps):
        trend["vs_teacher"] = {k: v for k, v in reward_trend(steps, "reward_vs_teacher").items() if k != "steps_with_reward_std"}
    if key == "reward" and (revisits := revisit_gains(steps)):
        trend["revisits"] = revisits
    return trend


def revisit_gains(steps: list[dict]) -> dict:
    """For each conversation (a row of ``episode_rows``, such as ``{"task": 3}``) played at two or
    more steps: its mean return at the last of them minus at the first. The mean gain over those
    conversations with a 95% percentile-bootstrap CI over them, and the per-conversation gains.
    Also the within-conversation slope: each such conversation's least-squares slope of its mean
    return against the step, over all its visits, averaged over the conversations with a bootstrap
    CI over them (the same as the gain per step between visits for two visits; with more, it uses
    the visits between too). Empty if no conversation was played twice."""
    import numpy as np

    visits: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for s in steps:
        per_row: dict[str, list[float]] = defaultdict(list)
        for row, reward in zip(s.get("episode_rows", []), s.get("episode_rewards", [])):
            per_row[json.dumps(row, sort_keys=True)].append(reward)  # a row is a dict: {"task": 3}
        for row, rewards in per_row.items():
            visits[row].append((s["step"], float(np.mean(rewards))))
    revisited = {row: v for row, v in sorted(visits.items()) if len(v) > 1}
    if not revisited:
        return {}
    from agents.commands.sweep import bootstrap_ci  # the interval of every held-out and sweep table

    gains = {row: v[-1][1] - v[0][1] for row, v in revisited.items()}
    slopes = [float(np.polyfit(*np.array(v, float).T, 1)[0]) for v in revisited.values()]
    g = list(gains.values())
    return {"conversations": len(g), "visits": sum(len(v) for v in revisited.values()),
            "mean_gain": float(np.mean(g)), "gain_ci95": list(bootstrap_ci(g)),
            "gain_per_conversation": {row: round(x, 4) for row, x in gains.items()},
            "within_slope_per_step": float(np.mean(slopes)), "within_slope_ci95": list(bootstrap_ci(slopes))}


def plot_steps(steps: list[dict], path: Path) -> None:
    """``curve.png`` from the run's per-step records: the episode returns of each step's group (dots),
    their mean with the least-squares trend, the group's reward std, and the share of replies with a
    parsed tool call."""
    import numpy as np
    from matplotlib.figure import Figure  # no pyplot: renders with Agg, no global state

    x = np.array([s["step"] for s in steps])
    relative = all("teacher_rewards" in s for s in steps)
    fig = Figure(figsize=(13 if relative else 10, 3.4))
    axes = fig.subplots(1, 4 if relative else 3)
    ax, ax_std, ax_calls = axes[0], axes[-2], axes[-1]
    for s in steps:
        ax.scatter([s["step"]] * len(s["episode_rewards"]), s["episode_rewards"], s=9, color="0.6")
    _mean_and_trend(ax, x, np.array([s["reward"] for s in steps]))
    ax.set(xlabel="step", ylabel="episode return", title="reward")
    if relative:
        ax_rel = axes[1]
        for s in steps:
            ax_rel.scatter([s["step"]] * len(s["episode_rewards"]),
                           np.subtract(s["episode_rewards"], s["teacher_rewards"]), s=9, color="0.6")
        _mean_and_trend(ax_rel, x, np.array([s["reward_vs_teacher"] for s in steps]))
        ax_rel.axhline(0.0, color="0.3", lw=0.8)
        ax_rel.set(xlabel="step", ylabel="return minus the teacher's", title="reward relative to the teacher\n(same conversation)")
    ax_std.bar(x, [s.get("reward_std", 0) for s in steps], color="C1")
    ax_std.set(xlabel="step", title="reward std in the group")
    ax_calls.plot(x, [s.get("replies_with_tool_call", np.nan) for s in steps], "o-", color="C2")
    ax_calls.set(xlabel="step", ylim=(0, 1.05), title="replies with a parsed tool call")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _mean_and_trend(ax, x, y) -> None:
    """Each step's group mean, and its least-squares trend line."""
    import numpy as np

    ax.plot(x, y, "o-", color="C0", label="group mean")
    if len(x) >= 2:
        slope, icept = np.polyfit(x, y, 1)
        ax.plot(x, icept + slope * x, "--", color="C3", label=f"trend {slope:+.4f}/step")
    ax.legend(fontsize=8)


def train(args: argparse.Namespace) -> dict:
    try:
        trainer, envs = build_trainer(args)
    except ValueError as err:
        if "--tool-template" in str(err):
            raise SystemExit(f"error: {err}") from None
        raise
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume_checkpoint(args))
    summary = summarize(trainer, time.perf_counter() - start)
    replies = [s["replies_with_tool_call"] for s in summary["steps"] if "replies_with_tool_call" in s]
    print(
        f"{summary['episodes']} episodes, {len(summary['steps'])} steps in {summary['wall_s']:.0f} s; mean reward "
        f"{sum(s['reward'] for s in summary['steps']) / max(len(summary['steps']), 1):+.4f}; replies with a tool call "
        f"{sum(replies) / max(len(replies), 1):.0%} (mean over steps); tool calls {summary['tool_calls']}, "
        f"{summary['tool_errors']} failed; env operations {summary['env_operations']}"
    )
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary["trend"] = reward_trend(summary["steps"])
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    if summary["steps"]:
        plot_steps(summary["steps"], out / "curve.png")
    if args.save:
        trainer.save_model(args.output_dir)
    return summary


def resume_checkpoint(args: argparse.Namespace) -> str | None:
    """With ``--resume``: the latest ``checkpoint-N`` in ``--output-dir`` (a ``SystemExit`` naming the
    directory if there is none); else None."""
    if not args.resume:
        return None
    from transformers.trainer_utils import get_last_checkpoint

    out = Path(args.output_dir)
    last = get_last_checkpoint(str(out)) if out.is_dir() else None
    if last is None:
        raise SystemExit(f"--resume: no checkpoint-N directory in {out}; a run saves them with --save-steps N")
    print(f"resuming from {last}")
    return last


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="local directory of a chat model")
    p.add_argument("--dry-run", action="store_true", help="play scripted rollouts through the adapter; no TRL needed")
    p.add_argument("--plot", type=Path, default=None, metavar="DIR",
                   help="draw DIR/curve.png from a run's DIR/steps.jsonl and print its reward trend (also done after training)")
    p.add_argument("--tool-template", action="store_true",
                   help="replace the model's chat template with the project's ChatML tool-calling one (for SmolLM2 and "
                        "other ChatML models whose template has no tool calling)")
    p.add_argument("--start-with-tool-call", action="store_true",
                   help="with --tool-template: every assistant reply starts with '<tool_call>' (a prefill), so a small "
                        "model writes tool calls rather than prose")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="compute precision (weights stay float32; bfloat16 is mixed precision); auto: float32 on a CPU "
                        "without bfloat16 instructions")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's). On a CPU shared with other jobs use 1: with 2 threads on a "
                        "busy 2-core machine, generation was 5-10x slower than with 1")
    p.add_argument("--horizon", type=int, default=4, help="sessions per episode")
    p.add_argument("--preset", default=None,
                   help="play a memr2 preset's training conversations in its env settings (e.g. small: turns and slices "
                        "per session, final-mode reward, max_questions); rows are its tasks 0..ROWS-1. Default: the env's own "
                        "settings, rows are reset seeds")
    p.add_argument("--seed-conversations", type=int, default=0, help="with --preset: the run seed whose conversations are drawn")
    p.add_argument("--max-questions", type=int, default=None, help="questions scored per session (default: all)")
    p.add_argument("--rows", type=int, default=64, help="dataset rows (tasks); 3 in a dry run")
    p.add_argument("--num-generations", type=int, default=4)
    p.add_argument("--micro-batch", type=int, default=None,
                   help="rollouts per forward/backward pass (default: --num-generations, the whole group); the optimizer "
                        "still steps once per group. Lower it for long episodes: without checkpointing, 4 rollouts of 2k "
                        "tokens held about 24 GB of activations")
    p.add_argument("--max-completion-length", type=int, default=2048)
    p.add_argument("--max-tool-calls", type=int, default=128, help="tool-calling rounds per rollout")
    p.add_argument("--max-steps", type=int, default=50)
    p.add_argument("--learning-rate", type=float, default=1e-6)
    p.add_argument("--lr-scheduler", default="linear", choices=("linear", "constant", "cosine"),
                   help="learning-rate schedule over --max-steps (linear: TRL's default, decays to 0)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0,
                   help="sample from the k most likely tokens only (0: the whole vocabulary, TRL's default; transformers' "
                        "generate() default is 50)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for memory (off: small models)")
    p.add_argument("--no-save", dest="save", action="store_false", help="do not save the trained model")
    p.add_argument("--save-steps", type=int, default=0, metavar="N",
                   help="save a checkpoint (model, optimizer, RNG and data position) every N steps, keeping the latest "
                        "(default 0: none); --resume continues from it")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --output-dir from its latest checkpoint, with the same options "
                        "(steps.jsonl keeps the steps up to the checkpoint's). A larger --max-steps extends a finished run: "
                        "the schedule is rebuilt over the new total, but the first step after the checkpoint runs at the rate "
                        "the checkpoint ended on (0 at the end of the linear schedule)")
    p.add_argument("--output-dir", default="runs/trl_grpo")
    return p


def main(argv: list[str] | None = None) -> None:
    ap = parser()
    args = ap.parse_args(argv)
    if args.start_with_tool_call and not args.tool_template:
        ap.error("--start-with-tool-call needs --tool-template (it is a feature of the project's template)")
    if args.plot:
        steps = read_steps(args.plot / "steps.jsonl")
        plot_steps(steps, args.plot / "curve.png")
        print(json.dumps(reward_trend(steps)))
    elif args.dry_run:
        dry_run(args.horizon, min(args.rows, 3))
    elif args.model:
        train(args)
    else:
        ap.error("give --model PATH, --dry-run or --plot DIR")


if __name__ == "__main__":
    main()
