"""The command line the checkpoint converters share (``tools/convert_classifier_to_detection.py``,
``tools/convert_san_official.py``): ``--config-file``, ``--input``, ``--output`` and ``KEY VALUE``
overrides; the paths checked before any work; one line on stderr for every failure.

Exit status: 0 written; 2 bad input (a :class:`~san_det.errors.UserInputError`: missing input,
an output that cannot be written, a bad config), nothing written; 1 a checkpoint that does not fit
the model (:class:`~san_det.classification.checkpoint.CheckpointMismatchError`, naming the key),
or an output file that could not be written (disk full).
"""

import argparse
import os
import sys
from typing import Callable, Dict, Tuple

import torch

from ..errors import UserInputError
from .checkpoint import CheckpointMismatchError

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
        _check_paths(args.input, args.output)
        checkpoint, summary = convert(args)
    except UserInputError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except CheckpointMismatchError as e:
        print(f"{prog}: error: {args.input}: {e}", file=sys.stderr)
        return 1
    try:
        torch.save(checkpoint, args.output)
    except (OSError, RuntimeError) as e:  # disk full: torch's zip writer raises RuntimeError
        print(f"{prog}: error: cannot write {args.output}: {e}", file=sys.stderr)
        return 1
    print(summary)
    return 0
