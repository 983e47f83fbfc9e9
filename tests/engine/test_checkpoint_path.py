"""The one checkpoint path: one decision of which file a run loads, checks applied in one load
that leaves no state behind (so a refused load does not break the next one, also on upstream
detectron2, whose ``DetectionCheckpointer.load`` asserts it is not re-entered)."""

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from torch import nn

from san_det.engine.checkpoint import SafeCheckpointer
from san_det.engine.checkpoint_rules import CheckpointChoice, choose_checkpoint
from san_det.errors import CheckpointError, UserInputError


@pytest.fixture
def run_folder(tmp_path):
    """``tmp_path/out`` with ``last_checkpoint`` naming ``model_0000009.pth`` (present)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "model_0000009.pth").write_bytes(b"")
    (out / "last_checkpoint").write_text("model_0000009.pth")
    return out


def test_choice_of_each_run(run_folder, tmp_path):
    last = str(run_folder / "model_0000009.pth")
    out, empty = str(run_folder), str(tmp_path / "empty")
    cases = [  # (weights, output_dir, resume, purpose) -> choice
        (("w.pth", out, False, "train"), CheckpointChoice("w.pth", resume=False, strict=False)),
        (("w.pth", out, True, "train"), CheckpointChoice(last, resume=True, strict=True)),
        (("w.pth", empty, True, "train"), CheckpointChoice("w.pth", resume=False, strict=False)),
        (("", empty, True, "train"), CheckpointChoice("", resume=False, strict=False)),
        (("w.pth", out, True, "eval"), CheckpointChoice(last, resume=False, strict=True)),
        (("w.pth", out, False, "eval"), CheckpointChoice("w.pth", resume=False, strict=True)),
        (("w.pth", out, True, "predict"), CheckpointChoice("w.pth", resume=False, strict=True)),
    ]
    for (weights, folder, resume, purpose), expected in cases:
        got = choose_checkpoint(weights, folder, resume=resume, purpose=purpose)
        assert got == expected, (weights, folder, resume, purpose)


def test_choice_errors(run_folder, tmp_path):
    with pytest.raises(UserInputError, match="--eval-only needs trained weights") as info:
        choose_checkpoint("", str(tmp_path), resume=True, purpose="eval")
    assert str(info.value).endswith(f"; {tmp_path / 'last_checkpoint'} does not exist")
    with pytest.raises(UserInputError, match="^MODEL.WEIGHTS is empty"):
        choose_checkpoint("", str(run_folder), resume=True, purpose="predict")
    (run_folder / "last_checkpoint").write_text("model_0000099.pth")
    for purpose in ("train", "eval"):
        with pytest.raises(CheckpointError, match="model_0000099.pth, which does not exist"):
            choose_checkpoint("w.pth", str(run_folder), resume=True, purpose=purpose)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))


def _upstream_load(original):
    """``DetectionCheckpointer.load`` as upstream main guards it: a load that raised leaves the
    guard set, and the next load fails its ``assert``."""

    def load(self, path, *args, **kwargs):
        assert getattr(self, "_upstream_guard", None) is None
        self._upstream_guard = path
        result = original(self, path, *args, **kwargs)
        self._upstream_guard = None
        return result

    return load


def test_a_refused_load_leaves_the_checkpointer_as_it_was(tmp_path, monkeypatch):
    monkeypatch.setattr(
        DetectionCheckpointer, "load", _upstream_load(DetectionCheckpointer.load)
    )
    SafeCheckpointer(_net(), str(tmp_path)).save("good")
    wider = nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5))
    torch.save({"model": wider.state_dict()}, tmp_path / "other.pth")
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    checkpointer = SafeCheckpointer(model, str(tmp_path))
    before = dict(vars(checkpointer))
    with pytest.raises(CheckpointError, match="'0.weight': shape"):
        checkpointer.load(str(tmp_path / "other.pth"), checkpointables=[], strict=True)
    assert vars(checkpointer) == before  # nothing of the refused load stays
    checkpointer.load(str(tmp_path / "good.pth"), checkpointables=[], strict=True)
    assert vars(checkpointer) == before
    torch.testing.assert_close(model[0].weight, _net()[0].weight, rtol=0, atol=0)
    checkpointer.load("", checkpointables=[])  # nothing to load: detectron2's own path
