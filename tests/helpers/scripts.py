"""Running the repository's scripts from tests: in-process as modules, or as child processes."""

import importlib.util
import logging
import os
from typing import List, NamedTuple

import pytest

from .paths import REPO_ROOT


def load_script(relative_path: str):
    """The script at ``relative_path`` of the repository (``"train_net.py"``,
    ``"tools/analyze_model.py"``) loaded as a module, without running its ``__main__`` block."""
    path = str(REPO_ROOT / relative_path)
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def child_env(helpers: bool = False, **extra: str) -> dict:
    """The environment for a child Python process: this one's with one OpenMP thread and
    ``extra``; ``helpers``: also the repository root first on ``PYTHONPATH``, so that the child
    imports ``tests.helpers`` (a user's run has no such path: leave it off otherwise)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    if helpers:
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p
        )
    return env


def drop_closed_log_handlers() -> None:
    """Remove logging handlers whose stream is closed. A ``train_net.cli`` run in a test attaches
    detectron2's console handlers to that test's captured ``sys.stdout``; every later log line
    through them prints a "--- Logging error ---" traceback."""
    loggers = [logging.getLogger()] + [
        lg for lg in logging.root.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    for lg in loggers:
        for handler in list(lg.handlers):
            stream = getattr(handler, "stream", None)
            if stream is not None and getattr(stream, "closed", False):
                lg.removeHandler(handler)


def error_lines(stderr: str, script: str = "train_net.py") -> List[str]:
    """The one-line errors (``"<script>: error: ..."``) of a script's ``stderr``."""
    return [line for line in stderr.splitlines() if line.startswith(f"{script}: error:")]


class CliResult(NamedTuple):
    """Exit status and stderr of a command line run in this process."""

    returncode: int
    stderr: str


def cli_in_process(module, capsys, *args: str) -> CliResult:
    """Run ``module.cli(args)`` (a script loaded by :func:`load_script`) in this process, which
    must end in ``SystemExit``; its exit status and what it wrote to stderr."""
    with pytest.raises(SystemExit) as exit_info:
        module.cli(list(args))
    return CliResult(exit_info.value.code, capsys.readouterr().err)


def assert_one_line_error(proc, *fragments: str, script: str = "train_net.py") -> None:
    """``proc`` (a ``CompletedProcess`` or :class:`CliResult`) exited with status 2 after exactly
    one ``"<script>: error: ..."`` line holding every fragment, and no traceback."""
    assert proc.returncode == 2, proc.stderr
    errors = error_lines(proc.stderr, script)
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
