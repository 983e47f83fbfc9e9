"""ImageClassifier (loss, outputs, bad input), the transforms, and every ImageNet config."""

import glob
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model
from PIL import Image

from san_det.classification import ImageClassifier, is_classification_config
from san_det.config import get_san_det_cfg
from san_det.classification.solver import resolve_classification_schedule
from san_det.data.classification_transforms import ClassificationTransform, pil_to_tensor
from tests.helpers.classification import tiny_san_cfg, tiny_sasa_cfg
from tests.helpers.paths import config_path

IMAGENET_CONFIGS = sorted(
    p
    for p in glob.glob(config_path("ImageNet", "*.yaml"))
    if not os.path.basename(p).startswith("Base-")
)


# Classifier parameters (millions) in SASA Table 1 (both stems) and SAN's official table.
PAPER_PARAMS_M = {
    "sasa26": 10.3,
    "sasa38": 14.1,
    "sasa50": 18.0,
    "san10_pairwise": 10.5,
    "san10_patchwise": 11.8,
    "san15_pairwise": 14.1,
    "san15_patchwise": 16.2,
    "san19_pairwise": 17.6,
    "san19_patchwise": 20.5,
}


def _batch(n=4, size=32, labels=True):
    g = torch.Generator().manual_seed(0)
    out = [
        {"image": torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8)}
        for _ in range(n)
    ]
    if labels:
        for i, x in enumerate(out):
            x["label"] = i % 10
    return out


@pytest.mark.parametrize("make_cfg", [tiny_sasa_cfg, tiny_san_cfg], ids=["sasa", "san"])
def test_classifier_train_and_inference(make_cfg):
    cfg = make_cfg(**{"CLASSIFICATION.LABEL_SMOOTHING": 0.1})
    torch.manual_seed(0)
    model = build_model(cfg)
    assert isinstance(model, ImageClassifier) and is_classification_config(cfg)
    batch = _batch()
    losses = model(batch)
    assert set(losses) == {"loss_cls"} and torch.isfinite(losses["loss_cls"])
    losses["loss_cls"].backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, no_grad
    # The loss is cross-entropy with label smoothing on the logits of the normalised images.
    model.eval()
    with torch.no_grad():
        outputs = model(batch)
        images = torch.stack([x["image"] for x in batch]).float() - model.pixel_mean
        logits = model.forward_head(model.forward_features(images / model.pixel_std))
    torch.testing.assert_close(torch.stack([o["logits"] for o in outputs]), logits)
    labels = torch.tensor([x["label"] for x in batch])
    model.train()
    torch.manual_seed(0)
    images = model.preprocess_image([x["image"] for x in batch])
    train_logits = model.forward_head(model.forward_features(images))
    torch.manual_seed(0)
    expected = F.cross_entropy(train_logits, labels, label_smoothing=0.1)
    torch.testing.assert_close(model(batch)["loss_cls"], expected)
    probs = torch.stack([o["probs"] for o in outputs])
    torch.testing.assert_close(probs.sum(1), torch.ones(4))
    assert probs.shape == (4, 10)


def test_classifier_bad_input():
    model = build_model(tiny_sasa_cfg())
    with pytest.raises(ValueError, match=r"label 12 is outside \[0, 10\)"):
        model([dict(x, label=12) for x in _batch(2)])
    with pytest.raises(ValueError, match='need a "label"'):
        model(_batch(2, labels=False))
    with pytest.raises(ValueError, match="same shape"):
        model(_batch(1) + _batch(1, size=64))
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        model([{"image": torch.zeros(1, 32, 32), "label": 0}] * 2)
    with pytest.raises(ValueError, match="not divisible by 32"):
        model(_batch(2, size=36))
    # Inference on images of different sizes: one at a time, each result as on its own.
    model.eval()
    mixed = _batch(1) + _batch(1, size=64)
    with torch.no_grad():
        together = model(mixed)
        alone = model(mixed[1:])
    torch.testing.assert_close(together[1]["logits"], alone[0]["logits"])
    with pytest.raises(ValueError, match="IN_FEATURE 'res9'.*outputs \\['res5'\\]"):
        build_model(tiny_sasa_cfg(**{"CLASSIFICATION.IN_FEATURE": "res9"}))
    with pytest.raises(ValueError, match="DROPOUT"):
        build_model(tiny_sasa_cfg(**{"CLASSIFICATION.DROPOUT": 1.0}))


def test_transforms():
    # A 40x20 image whose pixels encode their position.
    yy, xx = np.mgrid[0:20, 0:40]
    array = np.stack([xx * 5, yy * 10, np.full_like(xx, 77)], axis=2).astype(np.uint8)
    image = Image.fromarray(array)
    test = ClassificationTransform(False, test_resize=10, test_crop_size=8)
    out = test(image)  # resize shorter side 20 -> 10 (20x10), centre crop 8x8
    assert out.shape == (3, 8, 8) and out.dtype == torch.uint8
    reference = np.asarray(image.resize((20, 10), Image.BILINEAR))[1:9, 6:14]
    assert np.abs(out.permute(1, 2, 0).numpy().astype(int) - reference).max() <= 3
    bgr = ClassificationTransform(False, test_resize=10, test_crop_size=8, input_format="BGR")
    torch.testing.assert_close(bgr(image), out.flip(0))
    train = ClassificationTransform(True, train_crop_size=12, train_crop_scale=(0.2, 1.0))
    torch.manual_seed(0)
    crops = [train(image) for _ in range(20)]
    assert all(c.shape == (3, 12, 12) for c in crops)
    assert len({c.numpy().tobytes() for c in crops}) > 10  # random crops and flips
    assert all(int(c[2].float().mean().round()) == 77 for c in crops)
    for kwargs, key in [
        ({"test_crop_size": 300}, "TEST_CROP_SIZE"),
        ({"train_crop_scale": (0.5, 0.2)}, "TRAIN_CROP_SCALE"),
        ({"interpolation": "nearest-ish"}, "INTERPOLATION"),
        ({"input_format": "YUV"}, "INPUT.FORMAT"),
        ({"train_crop_size": 0}, "TRAIN_CROP_SIZE"),
    ]:
        with pytest.raises(ValueError, match=key):
            ClassificationTransform(True, **kwargs)
    with pytest.raises(ValueError, match="RGB image"):
        pil_to_tensor(Image.new("L", (4, 4)))


@pytest.mark.parametrize("path", IMAGENET_CONFIGS, ids=os.path.basename)
def test_imagenet_configs_build(path):
    cfg = get_san_det_cfg(path)
    cfg.MODEL.DEVICE = "cpu"
    assert is_classification_config(cfg)
    model = build_model(cfg)
    assert isinstance(model, ImageClassifier)
    assert model.classifier.out_features == cfg.CLASSIFICATION.NUM_CLASSES
    name = os.path.basename(path)
    if name.startswith(("sasa", "san")):
        family = "SASA" if name.startswith("sasa") else "SAN"
        assert cfg.MODEL.BACKBONE.NAME == f"build_{family.lower()}_backbone"
        depth = int(name[4:6] if family == "SASA" else name[3:5])
        assert getattr(cfg.MODEL, family).DEPTH == depth
        if family == "SAN":
            assert cfg.MODEL.SAN.SA_TYPE == name.split("_")[1].split(".")[0]
        else:
            assert cfg.MODEL.SASA.STEM == ("attention" if "full_attention" in name else "conv")
        assert cfg.INPUT.FORMAT == "RGB" and cfg.CLASSIFICATION.LABEL_SMOOTHING == 0.1
        assert cfg.SOLVER.LR_SCHEDULER_NAME == "WarmupCosineLR"
        resolved = resolve_classification_schedule(cfg, 1281167)
        epochs = 130 if family == "SASA" else 100
        assert resolved.SOLVER.MAX_ITER == -(-epochs * 1281167 // cfg.SOLVER.IMS_PER_BATCH)
        # The classifier's parameter count against the papers' tables (1000 classes).
        paper = PAPER_PARAMS_M[name.replace("_full_attention", "").replace(".yaml", "")]
        params = sum(p.numel() for p in model.parameters()) / 1e6
        assert abs(params - paper) / paper < 0.01, (params, paper)


@pytest.mark.parametrize("name", ["sasa26.yaml", "sasa26_full_attention.yaml"])
def test_sasa_recipe_starts_with_bounded_gradients(name):
    """The SASA configs' first gradient is moderate (ZERO_INIT_RESIDUAL): without it SASA's
    gradient norm at initialisation was in the thousands here and training diverged on a GPU."""
    cfg = get_san_det_cfg(config_path("ImageNet", name))
    cfg.MODEL.DEVICE = "cpu"
    torch.manual_seed(0)
    model = build_model(cfg)
    model(_batch(4))["loss_cls"].backward()
    grads = [p.grad.norm() for p in model.parameters() if p.grad is not None]
    assert float(torch.stack(grads).norm()) < 100.0
