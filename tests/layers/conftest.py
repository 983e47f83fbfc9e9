"""Fixtures of the layer tests."""

import pytest
import torch


@pytest.fixture
def deterministic_mode():
    """``torch.use_deterministic_algorithms(True)`` for the test (new tensors are NaN-filled)."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)
