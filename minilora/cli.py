"""The ``minilora`` command: one subcommand per job, each implemented in the module that owns it.

Every subcommand module provides ``add_arguments(parser)`` and ``run(args) -> int``; this file
routes (and imports each module lazily, so ``minilora --help`` is instant), and before running a
command makes malloc keep freed host memory for reuse (``backend.keep_freed_host_memory()``).
"""
from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__

# name -> (module, one-line help)
SUBCOMMANDS = {
    "demo": ("minilora.commands.demo", "the whole story on the shipped defaults: LoRA fine-tune, merge, save"),
    "pretrain": ("minilora.commands.pretrain", "pretrain the small base model that the package ships"),
    "finetune": ("minilora.commands.finetune", "LoRA fine-tune the base model on instruction data"),
    "merge": ("minilora.commands.merge", "merge an adapter into a base checkpoint, save a standalone model"),
    "quantize": ("minilora.quant.report", "quantize a checkpoint to NF4 and report size and error"),
    "check-article": ("minilora.teaching.article", "recompute every number in the LoRA article"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minilora", description="minilora: LoRA and QLoRA built from scratch in NumPy, to learn from.")
    parser.add_argument("--version", action="version", version=f"minilora {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, add_help=False)  # its own parser handles -h
        p.set_defaults(_module=module)
        p.set_defaults(_name=name)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args, _ = parser.parse_known_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    module = importlib.import_module(args._module)
    sub = argparse.ArgumentParser(prog=f"minilora {args._name}",
                                  description=SUBCOMMANDS[args._name][1])
    module.add_arguments(sub)
    sub_args = sub.parse_args(argv[argv.index(args._name) + 1:])
    from . import backend
    # every command trains, loads or quantizes: malloc keeps freed buffers for reuse (process-wide,
    # so a program opts in here, never on import; MINILORA_KEEP_FREED_MEMORY=0 turns it off)
    backend.keep_freed_host_memory()
    try:
        return int(module.run(sub_args) or 0)
    except (ValueError, OSError, RuntimeError, KeyError) as e:
        # one line that names the problem (the modules' messages say the fix); no traceback
        print(f"minilora {args._name}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
