"""Budget and learning signal of finished ``memr2 train`` runs, one table row per run.

For runs trained outside ``memr2 sweep`` (which reports the same columns itself): the
algorithm, seed and curriculum from the run's ``config.json``, then, from its
``metrics.jsonl``, update steps, generated tokens (rollouts and reruns: the budget two
algorithms are compared at), the share of zero-variance global and local groups (groups whose
members all got the same reward carry no learning signal), seconds per update and the
validation F1 after each stage::

    python benchmarks/run_summary.py runs/small-rl-s1 runs/small-grpo-s1 [--out summary.md]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def summary_rows(run_dirs: list[Path]) -> list[str]:
    """Markdown table lines, one row per run directory."""
    from agents.commands.logging import read_metrics, summarize_training

    lines = [
        "| run | algorithm | seed | curriculum | updates | generated tokens | zero-variance groups (global / local) "
        "| s / update | validation F1 |",
        "|---|---|---:|---|---:|---:|---:|---:|---|",
    ]
    for run in run_dirs:
        config_path, metrics_path = run / "config.json", run / "metrics.jsonl"
        if not config_path.is_file() or not metrics_path.is_file():
            raise SystemExit(f"{run}: not a memr2 train run directory (needs config.json and metrics.jsonl)")
        config = json.loads(config_path.read_text())
        s = summarize_training(read_metrics(metrics_path))
        stages = " -> ".join(f"{st['horizon']}:{st['steps']}" for st in config.get("stages", []))
        share = " / ".join("n/a" if v != v else f"{v:.0%}" for v in (s["zero_var_global"], s["zero_var_local"]))
        step_s = sum(s["step_s"]) / len(s["step_s"]) if s["step_s"] else float("nan")
        val = ", ".join(f"{f1:.3f}" for _, f1 in s["validation"]) or "-"
        lines.append(f"| {run.name} | {config.get('algo', '?')} | {config.get('seed', '?')} | {stages} | {s['updates']} "
                     f"| {s['generated_tokens']:,} | {share} | {step_s:.0f} | {val} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="memr2 train run directories")
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    args = parser.parse_args()
    text = "\n".join(summary_rows(args.runs)) + "\n"
    print(text, end="")
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
