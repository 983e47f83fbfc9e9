"""The command line the checkpoint converters share (``tools/convert_classifier_to_detection.py``,
``tools/convert_san_official.py``): ``--config-file``, ``--input``, ``--output`` and ``KEY VALUE``
overrides; the paths checked before any work; one line on stderr for every failure.

Exit status: 0 written; 2 bad input (a :class:`~san_det.errors.UserInputError`: missing or
unreadable input, ``--output`` naming the input file itself (also through a link), an output that
cannot be written, a bad config; or a checkpoint that does not fit the model,
:class:`~san_det.errors.CheckpointError`, naming the key and the input), nothing
written; 1 the output could not be written (disk full); 143 / 130 stopped by SIGTERM / SIGINT.
The output is written atomically (:func:`~san_det.utils.atomic.atomic_write`): whatever stops the
tool, there is no partial file under its name.
"""

import argparse
import os
import sys
from typing import Callable, Dict, Tuple

import torch

from ..engine.interrupt import Interrupted, interruptible
from ..errors import CheckpointError, UserInputError
from ..utils.atomic import atomic_write, os_error_in

__all__ = ["converter_parser", "run_converter"]

#: ``convert(args) -> (checkpoint to save, the line printed once it is written)``
Convert = Callable[[argparse.Namespace], Tuple[Dict, str]]


def converter_parser(prog: str, description: str, config_help: str) -> argparse.ArgumentParser:
    """The converters' arguments; a tool adds its own options to the parser."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config-file", required=True, help=config_help)
    parser.add_argument("--input", required=True, help="checkpoint to convert (.pth)")
    parser.add_argument("--output", required=True, help="converted checkpoint to write (.pth)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return parser


def _check_paths(input_path: str, output_path: str) -> None:
    if not os.path.isfile(input_path):
        raise UserInputError(f"input not found: {input_path}")
    if os.path.exists(output_path) and os.path.samefile(input_path, output_path):
        raise UserInputError(
            f"--output {output_path} is the --input file itself (the same file, or a link to "
            "it): write the converted checkpoint to another file"
        )
    folder = os.path.dirname(os.path.abspath(output_path))
    if os.path.isdir(output_path):
        raise UserInputError(f"--output {output_path} is a folder: name the file to write")
    if not os.path.isdir(folder):
        raise UserInputError(f"--output {output_path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise UserInputError(f"--output {output_path}: the folder {folder} is not writable")


def run_converter(prog: str, args: argparse.Namespace, convert: Convert) -> int:
    """Check ``args.input`` / ``args.output``, run ``convert(args)``, save its checkpoint to
    ``args.output``; returns the exit status (module docstring)."""
    try:
        with interruptible(f"the conversion; {args.output} was not written"):
            _check_paths(args.input, args.output)
            checkpoint, summary = convert(args)
            with atomic_write(args.output) as f:
                torch.save(checkpoint, f)
    except UserInputError as e:
        message = one_line(e)
        if isinstance(e, CheckpointError) and args.input not in message:  # names the key only
            message = f"{args.input}: {message}"
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return e.code
    except (OSError, RuntimeError) as e:  # disk full: torch's zip writer raises RuntimeError
        cause = os_error_in(e)
        if cause is None:
            raise
        print(
            f"{prog}: error: cannot write {args.output}: {cause.strerror or cause}; it was not "
            "written",
            file=sys.stderr,
        )
        return 1
    print(summary)
    return 0


def one_line(error: Exception) -> str:
    """``error``'s message on one line."""
    return " ".join(str(error).split())
