"""The ``memr2`` subcommands and what a run writes to disk.

Each subcommand module (:mod:`~agents.commands.train`, :mod:`~agents.commands.sft`,
:mod:`~agents.commands.evaluate`) provides ``add_arguments(parser)`` and ``run(args) -> int``;
:mod:`agents.cli` imports one only when it is used, so ``memr2 eval`` runs without torch.
:mod:`~agents.commands.checkpoint` and :mod:`~agents.commands.logging` hold checkpoints
and metrics.
"""
