"""Train a tool-calling model on ``MemSession-v0`` with TRL's ``GRPOTrainer``.

The model keeps the memory through four tools (``add_memory``, ``update_memory``,
``delete_memory``, ``next_turns``) of :class:`agents.trl_adapter.MemoryToolEnv`; the reward is the
env's episode return. Each dataset row names its task by ``seed``, so the ``num_generations``
rollouts of a row all face the same conversation, as GRPO needs.

    # a real run: TRL >= 1.16 and a local chat model whose template supports tool calling
    python examples/trl_grpo.py --model /path/to/local/instruct-model --horizon 4 --max-steps 50

    # no TRL, no model: a scripted tool user plays a few rows through the same adapter
    python examples/trl_grpo.py --dry-run

Nothing is downloaded: ``--model`` must be a local directory, and the Hugging Face hub is put in
offline mode before TRL is imported.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout

from agents.trl_adapter import DEFAULT_PROMPT, MemoryToolEnv  # noqa: E402

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


def train(args: argparse.Namespace) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not Path(args.model).is_dir():
        sys.exit(f"--model must be a local model directory (no downloads): {args.model}")
    try:
        from datasets import Dataset
        from trl import GRPOConfig, GRPOTrainer
    except ImportError:
        sys.exit("this example needs TRL: pip install 'memory-r2[trl]'")

    dataset = Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": DEFAULT_PROMPT}] for _ in range(args.rows)],
            "seed": list(range(args.rows)),
        }
    )
    config = GRPOConfig(
        output_dir=args.output_dir,
        num_generations=args.num_generations,
        per_device_train_batch_size=args.num_generations,
        max_completion_length=args.max_completion_length,
        max_tool_calling_iterations=args.max_tool_calls,
        max_steps=args.max_steps,
        logging_steps=1,
        report_to="none",
    )
    trainer = GRPOTrainer(
        model=args.model,
        train_dataset=dataset,
        args=config,
        # The env owns the reward (get_reward), so no reward_funcs are needed.
        environment_factory=MemoryToolEnv.factory(horizon=args.horizon, max_questions=args.max_questions),
    )
    trainer.train()
    trainer.save_model(args.output_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="local directory of a chat model with tool calling")
    parser.add_argument("--dry-run", action="store_true", help="play scripted rollouts through the adapter; no TRL needed")
    parser.add_argument("--horizon", type=int, default=4, help="sessions per episode")
    parser.add_argument("--max-questions", type=int, default=None, help="questions scored per session (default: all)")
    parser.add_argument("--rows", type=int, default=64, help="dataset rows (tasks); 3 in a dry run")
    parser.add_argument("--num-generations", type=int, default=4)
    parser.add_argument("--max-completion-length", type=int, default=2048)
    parser.add_argument("--max-tool-calls", type=int, default=128)
    parser.add_argument("--max-steps", type=int, default=50)
    parser.add_argument("--output-dir", default="runs/trl_grpo")
    args = parser.parse_args(argv)
    if args.dry_run:
        dry_run(args.horizon, min(args.rows, 3))
    elif args.model:
        train(args)
    else:
        parser.error("give --model PATH, or --dry-run")


if __name__ == "__main__":
    main()
