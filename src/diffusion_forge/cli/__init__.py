"""`dforge`: one command line over the toolkit.

Each subcommand lives in its own module in this package with two functions:
``register(subparsers)`` (adds its parser; imports only argparse, so ``dforge --help`` answers without
importing torch) and ``run(args) -> int``. Heavy imports happen inside ``run``.

:func:`main` is the one error boundary. Every expected failure (bad input, the file system, parse errors,
devices, checkpoints, an interrupted pipe) becomes one line on stderr, ``dforge CMD: error: ...``, and exit
status 2 (130 for Ctrl-C); an unexpected exception shows its traceback and asks for a bug report; ``-v``
shows the traceback of any error. Warnings print as one line ``dforge CMD: warning: ...``.
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
import traceback
import warnings

# subcommand name -> module in this package
COMMANDS = {"demo": "demo", "train": "train", "sample": "sample", "datasets": "datasets", "eval": "eval", "viz": "viz",
            "train-classifier": "train_classifier", "train-vae": "train_vae", "serve": "serve",
            "generate": "generate", "export": "export", "push": "push"}
BUG_REPORT = "this is a bug in Diffusion Forge: please report it with the command line and the traceback above"
ERROR, INTERRUPTED, SIGPIPE_EXIT = 2, 130, 141     # 141 = 128 + SIGPIPE, what a shell shows for `yes | head -1`
FORCE_HELP = "overwrite output files that already exist (without it an existing output is refused)"


class UserError(ValueError):
    """Bad input from the user: printed as one clear message, no traceback, exit status 2."""


class HelpFormatter(argparse.HelpFormatter):
    """Wraps one-paragraph texts, keeps texts laid out in lines (examples) as written, and appends
    "(default: X)" to every option whose default says something (not None, False, or an empty list) and
    whose help does not state it already."""

    def _fill_text(self, text, width, indent):
        if "\n" in text.strip():
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if ("%(default)" in text or "default:" in text or default is None or default is False or default == [] or default is argparse.SUPPRESS
                or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)"


def add_force(parser: argparse.ArgumentParser) -> None:
    """The one ``--force`` flag of every command that writes output files."""
    parser.add_argument("--force", action="store_true", help=FORCE_HELP)


def _add_verbose(parser: argparse.ArgumentParser, top: bool) -> None:
    """``-v`` before or after the subcommand; SUPPRESS keeps a subparser from resetting the global value."""
    parser.add_argument("-v", "--verbose", action="store_true", default=False if top else argparse.SUPPRESS,
                        help="show the full traceback of any error")
    parser.set_defaults(cli_prog=parser.prog.removeprefix("dforge "))
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):   # aliases map to the same parser
                _add_verbose(child, top=False)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dforge", description="Diffusion Forge: train, sample, guide, evaluate and share diffusion models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS.values():
        importlib.import_module(f"{__name__}.{module}").register(sub)
    _add_verbose(parser, top=True)
    return parser


# ---------------------------------------------------------------------------------------------
# Turning an exception into one line

# exception classes (module.name of any class in its MRO) that are expected: parse errors, safetensors' I/O
EXPECTED_NAMES = {"yaml.error.YAMLError", "yaml.YAMLError", "safetensors_rust.SafetensorError",
                  "safetensors._safetensors_rust.SafetensorError", "torch.OutOfMemoryError"}
# what a device-less torch says when asked for a device (RuntimeError or AssertionError)
DEVICE_PHRASES = ("not compiled with CUDA", "NVIDIA driver", "CUDA driver", "no CUDA GPUs", "Expected one of cpu",
                  "Invalid device", "MPS backend", "CUDA error", "out of memory")


def _qualnames(e: BaseException) -> set[str]:
    return {f"{c.__module__}.{c.__qualname__}" for c in type(e).__mro__}


def is_expected(e: BaseException) -> bool:
    """An error the user can fix (bad input, files, parsing, devices), not a bug of the toolkit."""
    if isinstance(e, (ValueError, OSError)) or _qualnames(e) & EXPECTED_NAMES:
        return True
    return isinstance(e, (RuntimeError, AssertionError)) and any(p in str(e) for p in DEVICE_PHRASES)


def describe(e: BaseException) -> str:
    """One line naming the problem (and, where it is known, the fix)."""
    from ..io.files import os_reason

    if isinstance(e, OSError) and e.errno is not None:
        reason = "it does not exist" if isinstance(e, FileNotFoundError) else os_reason(e)
        where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
        text = f"{where}: {reason}" if where else reason
    elif _qualnames(e) & EXPECTED_NAMES and (m := re.search(r"code: (\d+)", str(e))):   # safetensors' I/O error
        text = f"cannot write a safetensors file: {os_reason(OSError(int(m.group(1)), ''))}"
    elif _qualnames(e) & {"yaml.error.YAMLError", "yaml.YAMLError"}:
        text = f"not valid YAML: {e}"
    elif isinstance(e, (RuntimeError, AssertionError)) and not isinstance(e, ValueError):
        hint = "lower --batch-size" if "out of memory" in str(e) else "use --device cpu, or check the GPU set-up"
        text = f"{e} ({hint})"
    else:
        text = str(e) or type(e).__name__
    return " ".join(text.split())            # one line, whatever the exception held


def _warning_line(prog: str):
    def showwarning(message, category, filename, lineno, file=None, line=None):
        stream = file or sys.stderr
        try:
            stream.write(formatwarning(message, category, filename, lineno, line))
        except OSError:  # stderr gone: nothing to tell
            pass

    def formatwarning(message, category, filename, lineno, line=None):
        kind = "warning" if category in (UserWarning, Warning) else category.__name__
        return f"dforge {prog}: {kind}: {' '.join(str(message).split())}\n"

    return showwarning, formatwarning


def _quiet_broken_pipe() -> int:
    """Python's recipe for EPIPE: point stdout at /dev/null so the flush at exit cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):   # stdout is no real file (captured in tests)
        pass
    return SIGPIPE_EXIT


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prog, verbose = args.cli_prog, args.verbose
    with warnings.catch_warnings():
        warnings.showwarning, warnings.formatwarning = _warning_line(prog)
        try:
            code = int(args.func(args) or 0)
            sys.stdout.flush()              # an EPIPE of buffered output surfaces here, inside the boundary
            return code
        except KeyboardInterrupt:
            if verbose:
                traceback.print_exc()
            print(f"dforge {prog}: interrupted", file=sys.stderr)
            return INTERRUPTED
        except BrokenPipeError:             # `dforge ... | head -1`: the reader has gone; stop quietly
            return _quiet_broken_pipe()
        except Exception as e:
            expected = is_expected(e)
            if verbose or not expected:
                traceback.print_exc()
            if expected:
                print(f"dforge {prog}: error: {describe(e)}", file=sys.stderr)
                return ERROR
            print(f"dforge {prog}: internal error: {type(e).__name__}: {' '.join(str(e).split())}; {BUG_REPORT}",
                  file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
