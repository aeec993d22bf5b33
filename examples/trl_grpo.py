"""Train a tool-calling model on ``MemSession-v0`` with TRL's ``GRPOTrainer``.

The model keeps the memory through four tools (``add_memory``, ``update_memory``,
``delete_memory``, ``next_turns``) of :class:`agents.trl_adapter.MemoryToolEnv`; the reward is the
env's episode return. Each dataset row names its task by ``seed``, so the ``num_generations``
rollouts of a row all face the same conversation, as GRPO needs.

    # SmolLM2-135M-Instruct on a CPU: its own chat template has no tool calling, so use the
    # project's (agents/trl_template.py); --start-with-tool-call opens every reply with a call;
    # --threads 1 on a machine whose cores are shared with other jobs
    python examples/trl_grpo.py --model "$(memr2 models path smollm2-135m-instruct)" \\
        --tool-template --start-with-tool-call --threads 1 --horizon 2 --rows 8 --num-generations 2 \\
        --max-steps 30 --max-completion-length 64 --max-tool-calls 3 --temperature 0.7 --learning-rate 1e-5

    # a model whose template supports tool calling (Qwen3, Llama 3.1...), on a GPU
    python examples/trl_grpo.py --model /path/to/local/instruct-model --horizon 4 --max-steps 50

    # no TRL, no model: a scripted tool user plays a few rows through the same adapter
    python examples/trl_grpo.py --dry-run

The device and precision follow the machine (``--dtype auto``: bfloat16 mixed precision on a CPU
with bfloat16 instructions or a GPU that supports it, else float32; weights stay float32; see
``agents.trl_template.precision_settings``). Each step prints one line (reward, share of replies
with a parsed tool call, tool calls and errors, env operations) and appends it to
``OUTPUT_DIR/steps.jsonl``; at the end the totals go to ``OUTPUT_DIR/summary.json``.

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
from collections import Counter
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
    try:
        from datasets import Dataset
        from transformers import AutoTokenizer
        from trl import GRPOConfig, GRPOTrainer
    except ImportError:
        raise SystemExit("this example needs TRL: pip install 'memory-r2[trl]'") from None
    # TRL turns checkpointing on by default; recent transformers name the field activation_checkpointing
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in GRPOConfig.__dataclass_fields__ else "gradient_checkpointing"
    from agents.trl_template import apply_tool_template, precision_settings, with_tool_template_hint

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if args.tool_template:
        apply_tool_template(tokenizer)
        print("chat template: the project's ChatML tool-calling template (agents/trl_template.py) replaces the model's")
    precision = precision_settings(args.dtype, args.device)
    print(f"device {'cpu' if precision['use_cpu'] else 'cuda'}, weights float32, bf16 mixed precision {'on' if precision['bf16'] else 'off'}")

    if rows is None:
        rows = [{"seed": i} for i in range(args.rows)]
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": DEFAULT_PROMPT}], **row} for row in rows])
    config = GRPOConfig(
        output_dir=args.output_dir,
        num_generations=args.num_generations,
        per_device_train_batch_size=args.num_generations,
        max_completion_length=args.max_completion_length,
        max_tool_calling_iterations=args.max_tool_calls,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
        **{checkpointing: args.gradient_checkpointing},
        chat_template_kwargs={"start_with_tool_call": True} if args.start_with_tool_call else None,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        **precision,
    )
    envs: list[MemoryToolEnv] = []

    def make_env() -> MemoryToolEnv:  # TRL calls it with no arguments; keep each env for the summary
        env = MemoryToolEnv(**{"horizon": args.horizon, "max_questions": args.max_questions, **(env_kwargs or {})})
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
    trainer.add_callback(make_step_log(envs, Path(args.output_dir) / "steps.jsonl"))
    return trainer, envs


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
    calls: Counter = Counter()
    ops: Counter = Counter({k: 0 for k in _OPS})
    for h in episodes:
        calls.update(h["tool_calls"])
        ops.update({k: h["stats"].get(k, 0) for k in _OPS})
    return {
        "episodes": len(episodes),
        "tool_calls": dict(sorted(calls.items())),
        "tool_errors": sum(h["tool_errors"] for h in episodes),
        "env_operations": dict(ops),
        "finished_by_model": sum(h["finished_by_model"] for h in episodes),
        "episode_rewards": [h["reward"] for h in episodes],
    }


def make_step_log(envs: list[MemoryToolEnv], path: Path):
    """The callback that logs each step (a class made here: transformers is imported only when training)."""
    from transformers import TrainerCallback

    class StepLog(TrainerCallback):
        """After each logged step: that step's TRL figures plus the episodes the envs scored since the
        last step, printed as one line and appended to ``steps.jsonl`` (a long run can be read while
        it runs, and what it did survives an interruption)."""

        def __init__(self, envs: list[MemoryToolEnv], path: Path):
            self.envs, self.path, self.seen, self.records = envs, path, {}, []
            self.start = time.perf_counter()

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")

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


def step_log(trainer):
    """The example's callback on ``trainer`` (its ``records``: one dict per step)."""
    return next(cb for cb in trainer.callback_handler.callbacks if type(cb).__name__ == "StepLog")


def summarize(trainer, envs: list[MemoryToolEnv], wall_s: float) -> dict:
    """The run's per-step records and its totals over every scored episode."""
    return {"wall_s": round(wall_s, 1), "steps": step_log(trainer).records,
            **episode_totals([h for env in envs for h in env.history])}


def train(args: argparse.Namespace) -> dict:
    try:
        trainer, envs = build_trainer(args)
    except ValueError as err:
        if "--tool-template" in str(err):
            raise SystemExit(f"error: {err}") from None
        raise
    start = time.perf_counter()
    trainer.train()
    summary = summarize(trainer, envs, time.perf_counter() - start)
    replies = [s["replies_with_tool_call"] for s in summary["steps"] if "replies_with_tool_call" in s]
    print(
        f"{summary['episodes']} episodes, {len(summary['steps'])} steps in {summary['wall_s']:.0f} s; mean reward "
        f"{sum(s['reward'] for s in summary['steps']) / max(len(summary['steps']), 1):+.4f}; replies with a tool call "
        f"{sum(replies) / max(len(replies), 1):.0%} (mean over steps); tool calls {summary['tool_calls']}, "
        f"{summary['tool_errors']} failed; env operations {summary['env_operations']}"
    )
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    if args.save:
        trainer.save_model(args.output_dir)
    return summary


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="local directory of a chat model")
    p.add_argument("--dry-run", action="store_true", help="play scripted rollouts through the adapter; no TRL needed")
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
    p.add_argument("--max-questions", type=int, default=None, help="questions scored per session (default: all)")
    p.add_argument("--rows", type=int, default=64, help="dataset rows (tasks); 3 in a dry run")
    p.add_argument("--num-generations", type=int, default=4)
    p.add_argument("--max-completion-length", type=int, default=2048)
    p.add_argument("--max-tool-calls", type=int, default=128, help="tool-calling rounds per rollout")
    p.add_argument("--max-steps", type=int, default=50)
    p.add_argument("--learning-rate", type=float, default=1e-6)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0,
                   help="sample from the k most likely tokens only (0: the whole vocabulary, TRL's default; transformers' "
                        "generate() default is 50)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for memory (off: small models)")
    p.add_argument("--no-save", dest="save", action="store_false", help="do not save the trained model")
    p.add_argument("--output-dir", default="runs/trl_grpo")
    return p


def main(argv: list[str] | None = None) -> None:
    ap = parser()
    args = ap.parse_args(argv)
    if args.start_with_tool_call and not args.tool_template:
        ap.error("--start-with-tool-call needs --tool-template (it is a feature of the project's template)")
    if args.dry_run:
        dry_run(args.horizon, min(args.rows, 3))
    elif args.model:
        train(args)
    else:
        ap.error("give --model PATH, or --dry-run")


if __name__ == "__main__":
    main()
