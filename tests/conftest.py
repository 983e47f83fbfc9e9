"""Root conftest of the test suite.

Importing san_det here applies its detectron2 patches (``san_det/compat.py``) before any test
module imports detectron2. Tests marked ``cuda`` (``tests.helpers.skips.needs_cuda``) are skipped,
and reported as skipped, where no CUDA device is available.
"""

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
