"""The ``minilora`` command: one subcommand per job, each implemented in the module that owns it.

Every subcommand module provides ``add_arguments(parser)`` and ``run(args) -> int``; this file
routes (and imports each module lazily, so ``minilora --help`` is instant), and before running a
command makes malloc keep freed host memory for reuse (``backend.keep_freed_host_memory()``).

Every failure is one line on stderr and a non-zero exit: a bad argument or an error while running
(exit 2, argparse's code; ``--debug``, before or after the subcommand, shows the traceback
instead), Ctrl-C (exit 130, with the command that resumes the run when it saved a checkpoint).
Every subcommand's ``--help`` shows the defaults.
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
    "chat": ("minilora.commands.chat", "chat with SmolLM2 or the tiny base (and an adapter), tokens streamed"),
    "grade": ("minilora.commands.grade", "grade a class's exercise notebooks or scripts: a row per learner"),
}


class _OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line, ``minilora CMD: error: ...``, exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default after its help, except where there is nothing to show: a flag
    (default off) or an option whose default is None (its help says in words what happens then)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="minilora", description="minilora: LoRA and QLoRA built from scratch in NumPy, to learn from.")
    parser.add_argument("--version", action="version", version=f"minilora {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error instead of its one line")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, add_help=False)  # its own parser handles -h
        p.set_defaults(_module=module)
        p.set_defaults(_name=name)
    return parser


def build_subparser(name: str, module) -> argparse.ArgumentParser:
    """The parser of one subcommand: its module's arguments, defaults shown in --help, --debug."""
    sub = _OneLineParser(prog=f"minilora {name}", description=SUBCOMMANDS[name][1],
                         formatter_class=_DefaultsFormatter)
    module.add_arguments(sub)
    sub.add_argument("--debug", action="store_true",
                     help="show the full traceback of an error instead of its one line")
    return sub


def _one_line(error: BaseException) -> str:
    """The error as one line: its message (a library error names the problem and the fix), with the
    type's name for errors that are not the expected kinds."""
    text = " ".join(str(error).split()) or type(error).__name__
    if not isinstance(error, (ValueError, OSError, RuntimeError, KeyError)):
        text = f"{type(error).__name__}: {text}"
    return text


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args, _ = parser.parse_known_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    name = args._name
    module = importlib.import_module(args._module)
    sub = build_subparser(name, module)
    rest = argv[argv.index(name) + 1:]
    sub_args = sub.parse_args(rest)
    debug = args.debug or sub_args.debug
    from . import backend
    # every command trains, loads or quantizes: malloc keeps freed buffers for reuse (process-wide,
    # so a program opts in here, never on import; MINILORA_KEEP_FREED_MEMORY=0 turns it off)
    backend.keep_freed_host_memory()
    try:
        return int(module.run(sub_args) or 0)
    except KeyboardInterrupt as e:
        if debug:
            raise
        checkpoint = getattr(e, "checkpoint", None)
        if checkpoint is not None:
            print(f"minilora {name}: interrupted after step {e.step} of {e.steps}; resume with: "
                  f"minilora {name} --resume {checkpoint} (and the same other arguments)",
                  file=sys.stderr)
        else:
            print(f"minilora {name}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 -- every failure is one line unless --debug
        if debug:
            raise
        print(f"minilora {name}: error: {_one_line(e)} (--debug shows the traceback)",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
