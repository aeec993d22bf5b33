"""Environment speed and the cost of snapshots.

Prints two tables:

1. Environment steps per second with the oracle agent (agent time excluded), on default
   synthetic tasks at horizon 32.
2. ``save_state`` + ``restore_state`` against ``copy.deepcopy(env)`` for memory banks of 10,
   100, 1,000 and 10,000 entries, as times and ratios measured in this one run.
   Target: at 1,000 entries snapshot + restore is at least 50x cheaper than deepcopy, and it
   grows sub-linearly with the bank.

    python benchmarks/env_perf.py [--episodes 3] [--repeats 50]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time

import gymnasium as gym

import memenv  # noqa: F401
from agents.baselines import OracleAgent
from memenv.memory import MemoryBank, MemoryOp


def steps_per_second(episodes: int) -> tuple[float, int]:
    env = gym.make("MemSession-v0", horizon=32).unwrapped
    agent = OracleAgent()
    steps, env_time = 0, 0.0
    for seed in range(episodes):
        t = time.perf_counter()
        obs, info = env.reset(seed=seed)
        env_time += time.perf_counter() - t
        done = False
        while not done:
            action = agent.act(obs, info)
            t = time.perf_counter()
            obs, _, done, _, info = env.step(action)
            env_time += time.perf_counter() - t
            steps += 1
    return steps / env_time, steps


def env_with_bank(n: int):
    env = gym.make("MemSession-v0", horizon=32).unwrapped
    env.reset(seed=0)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    ops = [MemoryOp("ADD", text=f"Entry {i} {words[i % 12]} {words[(i * 7) % 12]} number {i}", speaker="Alice") for i in range(n)]
    bank, _ = MemoryBank().apply(ops, session=1, date="1 May 2023")
    env.restore_state(dataclasses.replace(env.save_state(), bank=bank))
    return env


def timeit(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(repeats):
            fn()
        best = min(best, (time.perf_counter() - t) / repeats)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--episodes", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args()

    sps, steps = steps_per_second(args.episodes)
    print(f"env steps/s with the oracle agent: {sps:,.0f} ({steps} steps, horizon 32, agent time excluded)\n")

    print("| bank entries | save+restore (us) | deepcopy(env) (us) | deepcopy / snapshot |")
    print("|---:|---:|---:|---:|")
    for n in (10, 100, 1_000, 10_000):
        env = env_with_bank(n)

        def snapshot():
            env.restore_state(env.save_state())

        t_snap = timeit(snapshot, args.repeats)
        t_copy = timeit(lambda: copy.deepcopy(env), max(1, args.repeats // (10 if n >= 1000 else 1)))
        print(f"| {n:,} | {t_snap * 1e6:,.1f} | {t_copy * 1e6:,.0f} | {t_copy / t_snap:,.0f}x |")


if __name__ == "__main__":
    main()
