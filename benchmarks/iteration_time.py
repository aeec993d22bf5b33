"""Wall time per training iteration: LoGo-GRPO against GRPO at the same group size n.

LoGo-GRPO adds the reruns of its local groups: with probability ``p_local`` per session, ``m``
reruns of that one session. Relative to the ``n`` whole-horizon rollouts of the global groups
that is about ``p_local * m / n`` more generation (the paper: 0.5 * 4 / 16 = 1/8, hence the
issue's target of at most 1.3x). This script runs both trainers from the same policy on the same
tasks, alternating them iteration by iteration so that machine noise hits both alike, and
reports the mean seconds per iteration, the generated tokens per iteration and their ratios.

    python benchmarks/iteration_time.py --model runs/tiny-logo-grpo-s0/warm_start --n 16 --horizon 8 --iters 3

Without ``--model`` a smoke-sized warm start is built first (about a minute).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="warm-started policy directory")
    ap.add_argument("--preset", default="tiny", help="preset for every other setting (default: tiny)")
    ap.add_argument("--n", type=int, nargs="+", default=[4, 16], help="group sizes to measure (default: 4 16)")
    ap.add_argument("--horizon", type=int, default=8)
    ap.add_argument("--iters", type=int, default=3, help="iterations per trainer and n")
    args = ap.parse_args()

    from agents.rl.grpo import GRPO, GRPOConfig
    from agents.rl.logo_grpo import LoGoConfig, LoGoGRPO
    from agents.policy import SharedPolicy
    from agents.generation.rollout import RolloutEngine
    from agents.presets import PRESETS, task_seeds, make_env_fn
    from agents.rl.update import UpdateConfig

    preset = PRESETS[args.preset]
    seeds = task_seeds(0, preset)
    model_dir = args.model
    if model_dir is None:
        from agents.commands.sft import warm_start

        model_dir = Path(tempfile.mkdtemp()) / "warm"
        warm_start(model_dir, PRESETS["smoke"], seed=0, task_seeds=seeds["sft"][:4], eval_seeds=seeds["val"][:1], progress=False)
    env_fn = make_env_fn(preset, args.horizon, seeds["train"])
    update = UpdateConfig(lr=preset.lr, epochs=preset.epochs, micro_batch=preset.micro_batch, kl_coef=0.0,
                          entropy_coef=preset.entropy_coef, temperature=preset.temperature)

    print(f"model: {model_dir}  preset: {args.preset}  horizon: {args.horizon}  iterations: {args.iters} per trainer")
    print("| n | GRPO s / iter | LoGo-GRPO s / iter | time ratio | GRPO tokens / iter | LoGo tokens / iter | token ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n in args.n:
        trainers = {}
        for name in ("grpo", "logo"):
            policy = SharedPolicy.from_pretrained(model_dir, prompt_style=preset.prompt_style)
            engine = RolloutEngine(policy, env_fn, temperature=preset.temperature, max_new_tokens=preset.max_new_tokens)
            common = dict(n_rollouts=n, max_questions=preset.max_questions, max_new_tokens=preset.max_new_tokens, update=update)
            if name == "grpo":
                trainers[name] = GRPO(policy, engine, env_fn().unwrapped, GRPOConfig(**common), seed=0)
            else:
                cfg = LoGoConfig(**common, p_local=preset.p_local, m_reruns=preset.m_reruns, local_max_questions=preset.local_max_questions)
                trainers[name] = LoGoGRPO(policy, engine, env_fn().unwrapped, cfg, seed=0)
        times = {name: [] for name in trainers}
        tokens = {name: [] for name in trainers}
        rng = np.random.default_rng(0)
        for step in range(args.iters):
            task = int(rng.integers(len(seeds["train"])))
            for name, trainer in trainers.items():
                before = trainer.generated_tokens
                t = time.perf_counter()
                trainer.step([task], step)
                times[name].append(time.perf_counter() - t)
                tokens[name].append(trainer.generated_tokens - before)
        g, lg = np.mean(times["grpo"]), np.mean(times["logo"])
        gt, lt = np.mean(tokens["grpo"]), np.mean(tokens["logo"])
        print(f"| {n} | {g:.1f} | {lg:.1f} | {lg / g:.2f}x | {gt:,.0f} | {lt:,.0f} | {lt / gt:.2f}x |")


if __name__ == "__main__":
    main()
