"""Per-seed paired differences of a sweep's runs, and a Student-t 95% CI over the seeds.

`memr2 sweep --report` pools the seeds' test conversations into one bootstrap CI, which does
not cover the spread between training seeds; this gives each seed's mean paired difference and
a t interval over them (docs/results.md, "The uncapped local reward, end to end"):

    python benchmarks/per_seed_paired.py benchmarks/results/credit-local-all \
        logo-grpo-q8:logo-grpo-qnone logo-grpo-q8:warm logo-grpo-qnone:warm grpo-q8:warm

A pair names two run prefixes (the run is ``<prefix>-s<seed>``); ``warm`` is the warm start's
held-out report of each seed, ``DIR/warm/held_out-s<seed>.json``. Seeds where either side has
not finished are left out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from agents.commands.sweep import mean_ci


def per_task(directory: Path, name: str, seed: int) -> np.ndarray | None:
    if name == "warm":
        path = directory / "warm" / f"held_out-s{seed}.json"
        return np.array(json.loads(path.read_text())["rows"]["warm"]["f1_per_task"]) if path.exists() else None
    path = directory / "results" / f"{name}-s{seed}.json"
    return np.array(json.loads(path.read_text())["test"]["f1_per_task"]) if path.exists() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path, help="a sweep directory with results/ (and warm/)")
    parser.add_argument("pairs", nargs="+", help="A:B run prefixes, e.g. logo-grpo-q8:grpo-q8")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    print("| A - B | seeds | per seed | over seeds (95% t CI) |\n|---|---:|---|---:|")
    for pair in args.pairs:
        a, _, b = pair.partition(":")
        diffs = []
        for seed in args.seeds:
            fa, fb = per_task(args.directory, a, seed), per_task(args.directory, b, seed)
            if fa is not None and fb is not None:
                diffs.append(float((fa - fb).mean()))
        if not diffs:
            continue
        mean, lo, hi, n = mean_ci(diffs)  # the sweep table's Student-t interval over seeds
        ci = f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]" if n > 1 else "-"
        print(f"| {a} - {b} | {n} | " + ", ".join(f"{x:+.3f}" for x in diffs) + f" | {ci} |")


if __name__ == "__main__":
    main()
