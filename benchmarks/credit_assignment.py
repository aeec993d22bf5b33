"""The credit-assignment study: GRPO vs LoGo-GRPO, with and without the horizon curriculum.

The toy-scale version of the paper's central ablation (paper, LoCoMo F1: LoGo-GRPO 49.67,
GRPO 46.62, no curriculum 24.12). For every configuration and seed it runs ``memr2 train``'s
job (``agents.commands.train.train``) from the same warm-started model (one warm start per seed, shared
by the four configurations), validates on held-out conversations every ``--val-every`` steps,
and records held-out F1 against the number of generated tokens so far (rerollouts included).
Configurations are compared at EQUAL budgets of generated tokens: each run's validation curve
is read at the smallest final budget reached by all runs of that seed (step interpolation:
the last validation at or below the budget).

Outputs under ``--out``: ``curves.csv`` (one row per validation), ``runs.csv`` (one row per
run: test F1, tokens, wall time, seconds per iteration), ``credit_assignment.png`` (held-out F1
against generated tokens, mean over seeds) and ``table.md`` (paste into docs/results.md).

    python benchmarks/credit_assignment.py --preset tiny --seeds 0 1 2 --out runs/credit
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

CONFIGS = {
    "logo-grpo": ("logo-grpo", True),
    "grpo": ("grpo", True),
    "logo-grpo, no curriculum": ("logo-grpo", False),
    "grpo, no curriculum": ("grpo", False),
}


def _flat(preset):
    from agents.rl.curriculum import Stage

    return replace(preset, stages=(Stage(preset.stages[-1].horizon, sum(s.steps for s in preset.stages)),))


def run_one(name, algo, curriculum, preset, seed, root: Path, warm: Path) -> dict:
    from agents.presets import train

    out = root / f"{name.replace(', ', '-').replace(' ', '-')}-s{seed}"
    if (out / "results.json").exists():
        return json.loads((out / "results.json").read_text()) | {"_dir": str(out)}
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    shutil.copytree(warm, out / "warm_start")  # the same starting policy for every configuration
    p = preset if curriculum else _flat(preset)
    t = time.perf_counter()
    res = train(p, out=out, algo=algo, seed=seed, progress=False, preset_name=f"study-{name}")
    res["wall_s"] = time.perf_counter() - t
    (out / "results.json").write_text(json.dumps(res, indent=2))
    return res | {"_dir": str(out)}


def step_times(run_dir: str) -> list[float]:
    times = []
    for line in Path(run_dir, "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "time/step_s" in rec:
            times.append(rec["time/step_s"])
    return times


def f1_at(curve: list[tuple[float, float]], budget: float) -> float:
    """Held-out F1 of the last validation at or below ``budget`` tokens (the warm start at 0)."""
    below = [f for tok, f in curve if tok <= budget]
    return below[-1] if below else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--val-every", type=int, default=1, help="validate every N steps (default 1)")
    ap.add_argument("--out", type=Path, default=Path("runs/credit_assignment"))
    ap.add_argument("--warm", type=Path, default=None,
                    help="start every seed from this warm-started policy (e.g. a `memr2 train` run's warm_start/); "
                         "default: one warm start per seed")
    args = ap.parse_args()

    from agents.rl.curriculum import validate
    from agents.policy import SharedPolicy
    from agents.commands.sft import warm_start
    from agents.presets import PRESETS, task_seeds, make_env_fn

    preset = replace(PRESETS[args.preset], val_every=args.val_every)
    args.out.mkdir(parents=True, exist_ok=True)
    curves_rows, run_rows = [], []
    for seed in args.seeds:
        seeds = task_seeds(seed, preset)
        warm = args.warm or args.out / f"warm-s{seed}"
        if not (warm / "config.json").exists():
            warm_start(warm, preset, seed=seed, task_seeds=seeds["sft"], eval_seeds=seeds["val"], progress=False)
        # Held-out F1 of the shared starting point, at each horizon the runs validate on.
        policy = SharedPolicy.from_pretrained(warm, prompt_style=preset.prompt_style)
        start_f1 = {}
        for stage in {s.horizon for s in preset.stages}:
            start_f1[stage] = validate(policy, make_env_fn(preset, stage, seeds["val"]), range(len(seeds["val"])), max_new_tokens=preset.max_new_tokens)["f1"]
        for name in args.configs:
            algo, curriculum = CONFIGS[name]
            res = run_one(name, algo, curriculum, preset, seed, args.out, warm)
            first_h = (preset.stages[0].horizon if curriculum else preset.stages[-1].horizon)
            curves_rows.append({"config": name, "seed": seed, "stage": -1, "horizon": first_h, "step": 0, "tokens": 0, "val_f1": start_f1[first_h]})
            for v in res["validation"]:
                curves_rows.append({"config": name, "seed": seed, "stage": v["stage"], "horizon": v["horizon"], "step": v["step"], "tokens": v["train_generated_tokens"], "val_f1": v["f1"]})
            times = step_times(res["_dir"])
            run_rows.append({
                "config": name, "seed": seed, "test_f1": res["test"]["f1"], "test_memory_size": res["test"]["memory_size"],
                "tokens": res["generated_tokens"], "wall_s": res.get("wall_s", float("nan")),
                "step_s": float(np.mean(times)) if times else float("nan"), "steps": len(times),
            })
            print(f"seed {seed} {name:28s} test F1 {res['test']['f1']:.3f} tokens {res['generated_tokens']:,}")

    with open(args.out / "curves.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(curves_rows[0]))
        w.writeheader()
        w.writerows(curves_rows)
    with open(args.out / "runs.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(run_rows[0]))
        w.writeheader()
        w.writerows(run_rows)

    # Equal-budget comparison, per seed: the smallest final budget among the configurations.
    budget_f1: dict[str, list[float]] = {n: [] for n in args.configs}
    for seed in args.seeds:
        budget = min(r["tokens"] for r in run_rows if r["seed"] == seed)
        for name in args.configs:
            curve = [(c["tokens"], c["val_f1"]) for c in curves_rows if c["seed"] == seed and c["config"] == name]
            budget_f1[name].append(f1_at(sorted(curve), budget))

    def ms(xs):
        xs = [x for x in xs if x == x]
        return f"{np.mean(xs):.3f} ± {np.std(xs):.3f}" if xs else "n/a"

    lines = [
        f"Preset `{args.preset}`, seeds {args.seeds}, validation every {args.val_every} step(s) on {preset.n_val} held-out conversations, test on {preset.n_test}.",
        "",
        "| configuration | held-out F1 at equal token budget | test F1 (end of run) | generated tokens | s / iteration |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in args.configs:
        rs = [r for r in run_rows if r["config"] == name]
        lines.append(
            f"| {name} | {ms(budget_f1[name])} | {ms([r['test_f1'] for r in rs])} | {np.mean([r['tokens'] for r in rs]):,.0f} | {np.mean([r['step_s'] for r in rs]):.1f} |"
        )
    # No LoGo/GRPO wall-time ratio here: "s / iteration" averages iterations of every horizon
    # the run visited, so it is not a like-for-like cost. benchmarks/iteration_time.py measures it.
    lines += ["", "s / iteration averages all horizons a run visits; for LoGo-GRPO's cost per iteration use benchmarks/iteration_time.py."]
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in args.configs:
        for seed in args.seeds:
            pts = sorted((c["tokens"], c["val_f1"]) for c in curves_rows if c["seed"] == seed and c["config"] == name)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", alpha=0.7, label=name if seed == args.seeds[0] else None,
                    color=f"C{args.configs.index(name)}", drawstyle="steps-post")
    ax.set_xlabel("generated tokens (rollouts + rerollouts)")
    ax.set_ylabel("held-out F1 (final memory)")
    ax.set_title(f"Credit assignment, preset {args.preset}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "credit_assignment.png", dpi=120)


if __name__ == "__main__":
    main()
