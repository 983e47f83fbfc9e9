"""san_det.compat: detectron2 0.6 imports and runs on today's stack; no-op with a full build."""

import importlib
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import san_det  # noqa: F401  (applies the compatibility patches)
from san_det import compat

needs_shim = pytest.mark.skipif(
    compat.HAS_DETECTRON2_EXTENSION, reason="full detectron2 with its C++ extension installed"
)


@pytest.mark.parametrize(
    "module",
    [
        "detectron2.data",
        "detectron2.modeling",
        "detectron2.evaluation",
        "detectron2.engine",
        "detectron2.checkpoint",
        "detectron2.utils.visualizer",
        "detectron2.model_zoo",
    ],
)
def test_detectron2_modules_import(module):
    assert importlib.import_module(module) is not None


def test_environment_report_runs():
    from detectron2.utils.collect_env import collect_env_info

    report = collect_env_info()
    assert "detectron2" in report and "PyTorch" in report


def test_removed_aliases_available_for_detectron2():
    assert Image.LINEAR == Image.BILINEAR
    assert np.int is int and np.float is float and np.bool in (bool, np.bool_)


@needs_shim
def test_missing_extension_ops_fail_clearly():
    from detectron2 import _C

    assert compat.is_applied()
    assert not hasattr(_C, "deform_conv_forward")
    with pytest.raises(compat.ExtensionUnavailableError, match="deform_conv_forward.*C\\+\\+"):
        _C.deform_conv_forward
    assert _C.has_cuda() is False


@needs_shim
def test_fast_coco_eval_needs_extension_and_is_not_used():
    from detectron2 import _C

    with pytest.raises(compat.ExtensionUnavailableError, match="fast COCO evaluator"):
        _C.COCOevalEvaluateImages


def test_ops_retinanet_needs_work_on_cpu():
    from detectron2.layers import batched_nms
    from detectron2.structures import Boxes, pairwise_iou

    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]], dtype=torch.float32)
    keep = batched_nms(boxes, torch.tensor([0.9, 0.8, 0.7]), torch.tensor([0, 0, 0]), 0.5)
    assert keep.tolist() == [0, 2]
    iou = pairwise_iou(Boxes(boxes), Boxes(boxes))
    assert torch.allclose(iou.diag(), torch.ones(3))


def test_apply_is_idempotent():
    before = dict(sys.modules)
    assert compat.apply() == compat.is_applied()
    assert set(sys.modules) == set(before)


def test_pkg_resources_available_for_model_zoo():
    import pkg_resources

    path = pkg_resources.resource_filename("detectron2", "config")
    assert path.endswith("config")
