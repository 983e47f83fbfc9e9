"""Fixtures of the classification tests: the embedded digits written into a temporary folder."""

import pytest

from san_det.data.embedded_digits import register_embedded_digits
from tests.helpers.classification import IMAGE_SIZE


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    """``(train_name, val_name, root)`` of the digits written at 16x16 into a temporary folder."""
    root = str(tmp_path_factory.mktemp("datasets"))
    train, val = register_embedded_digits(root, image_size=IMAGE_SIZE, prefix="test_digits")
    return train, val, root


@pytest.fixture(scope="session")
def digits32(tmp_path_factory):
    """As :func:`digits`, at the demo config's 32x32."""
    root = str(tmp_path_factory.mktemp("datasets32"))
    train, val = register_embedded_digits(root, image_size=32, prefix="test_digits32")
    return train, val, root
