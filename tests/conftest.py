"""Root conftest of the test suite.

Importing san_det here applies its detectron2 patches (``san_det/compat.py``) before any test
module imports detectron2. Tests marked ``cuda`` (``tests.helpers.skips.needs_cuda``) are skipped,
and reported as skipped, where no CUDA device is available. Logging handlers left writing to a
closed stream (a tool run in-process under ``capsys`` calls ``logging.basicConfig`` or detectron2's
``setup_logger``) are dropped before each test, so a later test's stderr holds no logging error.
A test not marked ``slow`` fails where it starts a script of :data:`SLOW_SCRIPTS` in a child
process: such a run is slow by nature, and ``make test`` leaves out only the tests marked slow.
"""

import logging
import os
import subprocess

import pytest
import torch

import san_det  # noqa: F401

pytest_plugins = ["pytester"]  # tests/test_helpers.py checks this conftest's cuda skip

#: the scripts whose run in a child process only a test marked ``slow`` may start
SLOW_SCRIPTS = ("train_net.py",)
UNGUARDED_POPEN = subprocess.Popen


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    no_cuda = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(no_cuda)


@pytest.fixture(autouse=True)
def _drop_handlers_of_closed_streams():
    loggers = [logging.getLogger()] + [
        lg for lg in logging.root.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    for logger in loggers:
        for handler in list(logger.handlers):
            if getattr(getattr(handler, "stream", None), "closed", False):
                logger.removeHandler(handler)
    yield


def _file_names(args) -> set:
    """The file names among the words of a command (``args`` as ``subprocess.Popen`` takes it)."""
    if isinstance(args, (str, bytes)):
        words = args.split()
    elif isinstance(args, os.PathLike):
        words = [args]
    else:
        words = list(args)
    return {os.path.basename(os.fsdecode(w)) for w in words}


@pytest.fixture(autouse=True)
def _script_runs_are_marked_slow(request, monkeypatch):
    if request.node.get_closest_marker("slow") is not None:
        return

    class GuardedPopen(UNGUARDED_POPEN):
        def __init__(self, args, *rest, **kwargs):
            for script in SLOW_SCRIPTS:
                if script in _file_names(args):
                    pytest.fail(
                        f"{request.node.nodeid} runs {script} in a child process: mark it "
                        "@pytest.mark.slow (`make test` leaves out only the tests marked slow)",
                        pytrace=False,
                    )
            super().__init__(args, *rest, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", GuardedPopen)
