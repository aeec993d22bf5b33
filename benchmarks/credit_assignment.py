"""The credit-assignment study: GRPO vs LoGo-GRPO, with and without the horizon curriculum.

The study is now a sweep spec, ``benchmarks/credit_assignment.toml``, run by ``memr2 sweep``
(Ray tasks, resumable, mean and 95% CI over seeds, equal-token-budget reading of the
validation curves; see docs/distributed.md). This script only runs that spec::

    python benchmarks/credit_assignment.py [--quick] [--out DIR] [--ray-address ADDR | --local]

is ``memr2 sweep benchmarks/credit_assignment.toml --out DIR ...`` (default ``--out
runs/credit_assignment``). Outputs under DIR: ``results.md`` and ``results.csv`` (one row per
configuration), ``runs.csv`` (one row per run), ``results.png`` and ``results/<run>.json``.

The old options map onto the spec: ``--preset`` is ``[sweep] preset``, ``--seeds`` the ``seed``
axis, ``--configs`` the ``algo`` and ``curriculum`` axes, ``--val-every`` the ``val_every``
setting, and ``--warm DIR`` (one starting policy for every run) is ``model = "DIR"`` under
``[settings]``; copy the spec and edit it.
"""

from __future__ import annotations

import sys
from pathlib import Path

SPEC = Path(__file__).with_suffix(".toml")


def main(argv: list[str] | None = None) -> int:
    from agents.cli import main as memr2

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    if "--out" not in argv and not any(a.startswith("--out=") for a in argv):
        argv += ["--out", "runs/credit_assignment"]
    return memr2(["sweep", str(SPEC), *argv])


if __name__ == "__main__":
    sys.exit(main())
