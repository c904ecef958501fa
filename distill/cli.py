"""`mmkd-distill`: one command, subcommands loaded lazily so `data` never pays for importing torch.

Each subcommand is a module with `add_arguments(parser)` and `run(args) -> int`. A module that is missing or
fails to import only breaks its own subcommand, and says so.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from types import ModuleType

from distill.errors import CommandError, MMKDDistillError

COMMANDS = {
    "data": ("distill.data.cli", "generate the embedded shapes-VQA dataset"),
    "train": ("distill.train", "train the teacher if needed, distil the student, evaluate"),
    "eval": ("distill.evaluate", "evaluate a run's checkpoints on the test split"),
}


def _load(command: str) -> ModuleType:
    module_name = COMMANDS[command][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise CommandError(f"'mmkd-distill {command}' is not available in this build ({module_name} is missing)") from exc
        raise CommandError(
            f"'mmkd-distill {command}' needs the Python package {exc.name!r}, which is not installed "
            f"(run `make install` or `pip install -e .`)"
        ) from exc
    if not (hasattr(module, "add_arguments") and hasattr(module, "run")):
        raise CommandError(f"'mmkd-distill {command}': {module_name} lacks add_arguments(parser) or run(args)")
    return module


def build_parser(argv: Sequence[str]) -> tuple[argparse.ArgumentParser, dict[str, ModuleType]]:
    """The parser; only the subcommand named in argv is imported (help lists them all without importing)."""
    parser = argparse.ArgumentParser(prog="mmkd-distill", description="Multimodal knowledge distillation.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    modules: dict[str, ModuleType] = {}
    for name, (_, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            modules[name] = _load(name)
            modules[name].add_arguments(sub)
    return parser, modules


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser, modules = build_parser(argv)
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        return int(modules[args.command].run(args) or 0)
    except MMKDDistillError as exc:
        print(f"mmkd-distill: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mmkd-distill: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
