"""Fixtures of the modeling tests. Importing san_det here patches detectron2 before any test
module imports it, and registers san_det's components."""

import pytest
import torch

import san_det  # noqa: F401
import san_det.modeling  # noqa: F401


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
