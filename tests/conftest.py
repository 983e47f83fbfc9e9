"""Root conftest of the test suite.

Importing san_det here applies its detectron2 patches (``san_det/compat.py``) before any test
module imports detectron2. Tests marked ``cuda`` (``tests.helpers.skips.needs_cuda``) are skipped,
and reported as skipped, where no CUDA device is available. Logging handlers left writing to a
closed stream (a tool run in-process under ``capsys`` calls ``logging.basicConfig`` or detectron2's
``setup_logger``) are dropped before each test, so a later test's stderr holds no logging error.
"""

import logging

import pytest
import torch

import san_det  # noqa: F401

pytest_plugins = ["pytester"]  # tests/test_helpers.py checks this conftest's cuda skip


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
