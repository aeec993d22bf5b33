"""Overhead and scaling of distributed rollouts: in process against ``--workers 1`` and ``--workers 2``.

Each configuration trains its own copy of the same policy with LoGo-GRPO on the same tasks and
seeds, so the three runs do the same work (the script checks that their metrics agree) and
only where the rollouts run differs. At the same total thread count: the in-process run uses
all ``--threads`` torch threads; one worker gets all of them; two workers get half each. The
learner (the update) always runs in the driver with all threads, while the workers wait.
Iterations alternate between the configurations in rounds, the order rotating from round to
round (A B C, B C A, C A B, ...), so that drift of a shared machine hits all alike and no
configuration always runs right after another; the first round is a warm-up and not counted.
Each configuration's ratio to in process is taken within each round and the median over rounds
reported: on a machine shared with other jobs the iteration times themselves drift far more
than the ratios do.

Reported per configuration: seconds per iteration (mean over the counted iterations), of which
rollouts and update, the ratio to in process (median of the per-round ratios, with their range),
and for the workers the share of the iteration
spent broadcasting weights (the driver's ``ray.put`` plus the workers' loading, per worker) and
the rest of the distribution overhead (rollout wall time minus the broadcast and the workers'
mean own generation and env time: dispatch, pickling, and waiting for the slowest shard).

    python benchmarks/distributed_perf.py [--model DIR] [--horizon 2] [--n 4] [--iters 6]

Without ``--model`` a smoke-sized warm start is built first (about a minute; its path is
printed with the table, so a second run can reuse it). ``--threads 1`` measures Ray's own
overhead without thread contention (the in-process run and the single worker get one thread,
each of two workers one). Measured figures and what they mean: docs/distributed.md.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="warm-started policy directory")
    ap.add_argument("--preset", default="tiny", help="preset for every other setting (default: tiny)")
    ap.add_argument("--horizon", type=int, default=2)
    ap.add_argument("--n", type=int, default=4, help="global group size")
    ap.add_argument("--tasks", type=int, default=2, help="conversations per iteration")
    ap.add_argument("--iters", type=int, default=6, help="rounds: iterations per configuration (the first is a warm-up)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="total torch threads (default: all CPUs)")
    ap.add_argument("--dtype", default=None, help="weight dtype of the policy (default: the preset's)")
    args = ap.parse_args()

    import ray
    import torch

    from agents.generation.distributed import WorkerPool
    from agents.generation.rollout import RolloutEngine
    from agents.policy import SharedPolicy
    from agents.presets import PRESETS, make_env_fn, task_seeds
    from agents.rl.logo_grpo import LoGoConfig, LoGoGRPO
    from agents.rl.update import UpdateConfig

    torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    if args.dtype:
        preset = replace(preset, dtype=args.dtype)
    seeds = task_seeds(0, preset)
    model_dir = args.model
    if model_dir is None:
        from agents.commands.sft import warm_start

        model_dir = Path(tempfile.mkdtemp(prefix="distributed-perf-")) / "warm"
        smoke = PRESETS["smoke"]
        warm_start(model_dir, smoke, seed=0, task_seeds=task_seeds(0, smoke)["sft"], eval_seeds=task_seeds(0, smoke)["val"], progress=False)

    env_fn = make_env_fn(preset, args.horizon, seeds["train"])
    cfg = LoGoConfig(
        n_rollouts=args.n, tasks_per_step=args.tasks, max_questions=preset.max_questions, max_new_tokens=preset.max_new_tokens,
        p_local=preset.p_local, m_reruns=preset.m_reruns, local_max_questions=preset.local_max_questions,
        update=UpdateConfig(lr=preset.lr, epochs=preset.epochs, micro_batch=preset.micro_batch, kl_coef=0.0,
                            temperature=preset.temperature),
    )
    sampling = {"temperature": preset.temperature, "max_new_tokens": preset.max_new_tokens, "max_batch": preset.rollout_batch}

    def load():
        return SharedPolicy.from_pretrained(model_dir, prompt_style=preset.prompt_style, dtype=preset.dtype)

    # Logical CPUs for both pools at once (idle actors use none): 1 x threads and 2 x threads/2
    # (at least one each: with --threads 1 the two workers get a thread each). Too few, and the
    # last actors could never be placed: the pool would wait for them forever.
    configs = (("in process", 0), ("1 worker", 1), ("2 workers", 2))
    ray.init(num_cpus=sum(w * max(1, args.threads // w) for _, w in configs if w), include_dashboard=False, logging_level="ERROR")
    runs, pools = {}, []
    for name, workers in configs:
        policy = load()
        if workers:
            pool = WorkerPool(policy, workers, threads_per_worker=max(1, args.threads // workers))
            pools.append(pool)
            engine = pool.engine(policy, env_fn, **sampling)
        else:
            engine = RolloutEngine(policy, env_fn, **sampling)
        runs[name] = {"trainer": LoGoGRPO(policy, engine, env_fn().unwrapped, cfg, seed=0), "workers": workers, "records": []}

    tasks = list(range(args.tasks))
    names = list(runs)
    for it in range(args.iters):
        for k in range(len(names)):
            name = names[(it + k) % len(names)]
            run = runs[name]
            engine = run["trainer"].engine
            before = dict(engine.timing)
            t0 = time.perf_counter()
            metrics = run["trainer"].step(tasks, it)
            wall = time.perf_counter() - t0
            delta = {k: engine.timing[k] - before.get(k, 0) for k in engine.timing}
            run["records"].append({"wall": wall, "rollout": metrics["time/rollout_s"], "metrics": metrics, "timing": delta})
            print(f"iteration {it + 1}/{args.iters}  {name:<10}  {wall:7.1f} s  (rollouts {metrics['time/rollout_s']:.1f} s)", flush=True)

    # The same work everywhere: every configuration's metrics agree with the in-process run's.
    want = [r["metrics"] for r in runs["in process"]["records"]]
    mismatches = 0
    for name, run in runs.items():
        for got, ref in zip((r["metrics"] for r in run["records"]), want):
            for key, value in ref.items():
                if not key.startswith("time/") and not np.isclose(got[key], value, rtol=1e-3, atol=1e-4):
                    mismatches += 1
                    print(f"WARNING: {name}: {key} = {got[key]} against {value} in process")
    tokens = [r["metrics"]["generated_tokens"] for r in runs["in process"]["records"]]
    print(f"\nsame metrics in every configuration: {'yes' if not mismatches else f'NO ({mismatches} differ)'}; "
          f"generated tokens per iteration {np.diff([0, *tokens]).astype(int).tolist()}, "
          f"update rows {[int(r['metrics'].get('update/rows', 0)) for r in runs['in process']['records']]}")

    print(f"model {model_dir}, horizon {args.horizon}, n {args.n}, {args.tasks} conversations, {args.threads} threads in all, "
          f"{args.iters - 1} counted iterations each")
    print("| configuration | s / iteration | rollouts (s) | update (s) | vs in process (median of rounds [range]) | weight broadcast | other overhead |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    ref_walls = [r["wall"] for r in (runs["in process"]["records"][1:] or runs["in process"]["records"])]
    for name, run in runs.items():
        counted = run["records"][1:] or run["records"]
        wall = float(np.mean([r["wall"] for r in counted]))
        rollout = float(np.mean([r["rollout"] for r in counted]))
        ratios = [r["wall"] / ref for r, ref in zip(counted, ref_walls)]
        broadcast = other = "-"
        if run["workers"]:
            per_iter = [r["timing"]["broadcast_s"] + r["timing"]["weights_load_s"] / run["workers"] for r in counted]
            broadcast = f"{np.mean(per_iter) / wall:.1%}"
            # Distribution overhead: rollout wall time beyond the workers' own (generation + env) time.
            own = [(r["timing"]["generate_s"] + r["timing"]["env_s"]) / run["workers"] for r in counted]
            other = f"{max(0.0, rollout - float(np.mean(own)) - float(np.mean(per_iter))) / wall:.1%}"
        print(f"| {name} | {wall:.1f} | {rollout:.1f} | {wall - rollout:.1f} | {np.median(ratios):.2f}x "
              f"[{min(ratios):.2f}, {max(ratios):.2f}] | {broadcast} | {other} |")
    for pool in pools:
        pool.close()
    ray.shutdown()


if __name__ == "__main__":
    main()
