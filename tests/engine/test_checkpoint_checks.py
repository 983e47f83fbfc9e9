"""Checkpoints: recorded architecture, trusted pickles, disk full; no-detection evaluation."""

import argparse
import errno
import logging
import os
import resource
import subprocess
import sys
import textwrap

import pytest
import torch
from detectron2.modeling import build_model  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402

import san_det  # noqa: F401  (patches detectron2 before it is imported)
from san_det.config import setup_cfg
from san_det.detection import DetectionTrainer
from san_det.engine import SafeCheckpointer
from san_det.engine.checkpoint import (
    ARCHITECTURE_KEY,
    CheckpointError,
    CheckpointWriteError,
    checkpointer_options,
)
from san_det.detection.coco_evaluation import COCOEvaluatorNoDetectionsIsZero
from san_det.engine.output_lock import LOCK_FILE_NAME
from san_det.modeling.architecture import architecture_config, architecture_differences
from tests.helpers.coco_files import register_coco_dataset, simple_images
from tests.helpers.paths import REPO_ROOT
from tests.helpers.scripts import child_env, drop_closed_log_handlers, error_lines, load_script
from tests.helpers.tiny_detection import tiny_retinanet_cfg

DEMO = str(REPO_ROOT / "configs/Demo/shapes_retinanet.yaml")
SAN10 = str(REPO_ROOT / "configs/COCO-Detection/retinanet_san10_pairwise.yaml")


train_net = load_script("train_net.py")


@pytest.fixture(autouse=True)
def _no_launch(monkeypatch):
    """No training run starts; no handler left on a closed stream by earlier tests prints."""
    drop_closed_log_handlers()

    def launch(*args, **kwargs):
        pytest.fail("check_input let the input through: training would start")

    monkeypatch.setattr(train_net, "launch", launch)


def _cli(capsys, *args, output_dir):
    """``train_net.py --config-file DEMO ARGS OUTPUT_DIR output_dir``: its one error line."""
    with pytest.raises(SystemExit) as info:
        train_net.cli(["--config-file", DEMO, *args, "OUTPUT_DIR", str(output_dir)])
    err = capsys.readouterr().err
    errors = error_lines(err)
    assert info.value.code == 2 and len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def _demo_cfg(tmp_path, *opts):
    return setup_cfg(DEMO, ["OUTPUT_DIR", str(tmp_path / "unused"), *opts], check_output=False)


@pytest.fixture
def demo_checkpoint(tmp_path):
    """An (untrained) demo model saved by a SafeCheckpointer: ``(folder, path)``."""
    cfg = _demo_cfg(tmp_path)
    folder = tmp_path / "run"
    SafeCheckpointer(build_model(cfg), str(folder), **checkpointer_options(cfg)).save(
        "model_final", iteration=0
    )
    return folder, folder / "model_final.pth"


# ------------------------------------------------------------------------------- architecture
def test_architecture_config_holds_the_model_keys_only(tmp_path):
    arch = architecture_config(_demo_cfg(tmp_path))
    assert arch["MODEL.SASA.NUM_HEADS"] == 4 and arch["MODEL.SASA.KERNEL_SIZE"] == 7
    assert arch["MODEL.RETINANET.NUM_CLASSES"] == 3 and "MODEL.FPN.OUT_CHANNELS" in arch
    assert "MODEL.ANCHOR_GENERATOR.SIZES" in arch
    assert "MODEL.PIXEL_MEAN" not in arch  # recorded and checked by modeling.input_info
    assert not any(k.startswith("MODEL.SAN.") for k in arch)
    for training_only in (
        "MODEL.SASA.ZERO_INIT_RESIDUAL",
        "MODEL.RETINANET.SCORE_THRESH_TEST",
        "MODEL.RETINANET.FOCAL_LOSS_GAMMA",
        "MODEL.BACKBONE.FREEZE_AT",
    ):
        assert training_only not in arch
    san = architecture_config(setup_cfg(SAN10, ["MODEL.DEVICE", "cpu"], check_output=False))
    assert san["MODEL.SAN.PAD_MODE"] == "reflect" and not any("SASA" in k for k in san)
    torch.save({"a": arch}, tmp_path / "plain.pth")  # plain values: weights_only loads them
    assert torch.load(tmp_path / "plain.pth")["a"] == arch


def test_architecture_differences_strict_and_fine_tune(tmp_path):
    ours = architecture_config(_demo_cfg(tmp_path))
    theirs = dict(
        ours,
        **{
            "MODEL.SASA.NUM_HEADS": 8,
            "MODEL.RETINANET.NUM_CLASSES": 80,
            "MODEL.SASA.OUT_FEATURES": ["res5"],
        },
    )
    strict = architecture_differences(theirs, ours)
    assert [k for k, _, _ in strict] == [
        "MODEL.SASA.NUM_HEADS",
        "MODEL.SASA.OUT_FEATURES",
        "MODEL.RETINANET.NUM_CLASSES",
    ]
    assert strict[0] == ("MODEL.SASA.NUM_HEADS", 8, 4)
    fine_tune = architecture_differences(theirs, ours, fine_tune=True)
    assert fine_tune == [("MODEL.SASA.NUM_HEADS", 8, 4)]
    assert architecture_differences(ours, ours) == []
    assert architecture_differences({}, ours) == []  # nothing recorded: nothing to compare


def test_trainer_checkpoints_record_the_architecture(tmp_path):
    register_coco_dataset("arch_train", str(tmp_path / "data"), simple_images(4))
    cfg = tiny_retinanet_cfg(str(tmp_path / "out"), ("arch_train",), max_iter=1)
    trainer = DetectionTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    saved = torch.load(tmp_path / "out" / "model_final.pth")
    assert saved[ARCHITECTURE_KEY] == architecture_config(cfg)


def test_shape_preserving_architecture_change_is_refused_when_strict(
    demo_checkpoint, tmp_path, caplog
):
    _, path = demo_checkpoint
    cfg = _demo_cfg(tmp_path, "MODEL.SASA.NUM_HEADS", "2")
    model = build_model(cfg)
    checkpointer = SafeCheckpointer(model, **checkpointer_options(cfg))
    with pytest.raises(
        CheckpointError,
        match=r"another architecture: MODEL.SASA.NUM_HEADS 4 " r"there, 2 here; its tensors fit",
    ):
        checkpointer.load(str(path), checkpointables=[], strict=True)
    with caplog.at_level(logging.WARNING):
        checkpointer.load(str(path), checkpointables=[])  # fine-tuning: a warning naming it
    assert "MODEL.SASA.NUM_HEADS 4 there, 2 here" in caplog.text
    # same architecture, and a checkpoint that records none: load
    same = _demo_cfg(tmp_path)
    SafeCheckpointer(build_model(same), **checkpointer_options(same)).load(
        str(path), checkpointables=[], strict=True
    )
    bare = tmp_path / "bare.pth"
    torch.save({"model": torch.load(path)["model"]}, bare)
    checkpointer.load(str(bare), checkpointables=[], strict=True)


def test_eval_only_with_another_num_heads_is_one_line_before_any_output(
    demo_checkpoint, tmp_path, capsys
):
    _, path = demo_checkpoint
    opts = ["MODEL.WEIGHTS", str(path), "MODEL.SASA.NUM_HEADS", "2"]
    error = _cli(capsys, "--eval-only", *opts, output_dir=tmp_path / "o")
    assert str(path) in error and "MODEL.SASA.NUM_HEADS 4 there, 2 here" in error
    assert not (tmp_path / "o").exists()


def test_resume_with_another_architecture_writes_nothing(demo_checkpoint, capsys):
    folder, path = demo_checkpoint
    before = sorted(os.listdir(folder))
    error = _cli(capsys, "--resume", "MODEL.SASA.KERNEL_SIZE", "5", output_dir=folder)
    assert str(path) in error and "MODEL.SASA.KERNEL_SIZE 7 there, 5 here" in error
    assert sorted(os.listdir(folder)) == before  # no config.yaml, no log.txt


def test_mismatched_tensors_are_refused_before_any_output(demo_checkpoint, tmp_path, capsys):
    _, path = demo_checkpoint
    opts = ["MODEL.WEIGHTS", str(path), "MODEL.RETINANET.NUM_CLASSES", "5"]
    error = _cli(capsys, "--eval-only", *opts, output_dir=tmp_path / "o")
    assert "'head.cls_score.weight'" in error and "MODEL.RETINANET.NUM_CLASSES 3 there" in error
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------ trusted files
def test_pickle_with_objects_is_named_and_trusted_loads_it(demo_checkpoint, tmp_path, capsys):
    _, path = demo_checkpoint
    pickled = tmp_path / "with_args.pth"
    torch.save(dict(torch.load(path), args=argparse.Namespace(lr=0.1)), pickled)
    error = _cli(capsys, "--eval-only", "MODEL.WEIGHTS", str(pickled), output_dir=tmp_path / "o")
    assert "valid pickle" in error and "argparse.Namespace" in error, error
    assert "MODEL.WEIGHTS_TRUSTED True" in error and "corrupt" not in error
    assert "\x1b" not in error
    assert not (tmp_path / "o").exists()
    cfg = _demo_cfg(tmp_path, "MODEL.WEIGHTS", str(pickled), "MODEL.WEIGHTS_TRUSTED", "True")
    DetectionTrainer.check_config(cfg, eval_only=True)  # the check in check_input passes
    extra = SafeCheckpointer(build_model(cfg), **checkpointer_options(cfg)).load(
        str(pickled), checkpointables=[], strict=True
    )
    assert extra["args"].lr == 0.1


def test_garbage_is_still_called_corrupt(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    cfg = _demo_cfg(tmp_path)
    with pytest.raises(CheckpointError, match="truncated or corrupt.*Unsupported operand") as info:
        SafeCheckpointer(build_model(cfg)).load(str(junk), checkpointables=[])
    assert "\x1b" not in str(info.value) and "valid pickle" not in str(info.value)


# --------------------------------------------------------------------------------- disk full
class _FullDisk:
    """A binary file that takes ``room`` bytes, then fails like a full disk (ENOSPC)."""

    def __init__(self, path, room):
        self._file, self._room = open(path, "wb"), room

    def write(self, data):
        if self._room < len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= len(data)
        return self._file.write(data)

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()


def test_disk_full_while_checkpointing_is_one_clear_error(tmp_path, monkeypatch):
    import san_det.utils.atomic as atomic_module  # where checkpoints are opened for writing

    cfg = _demo_cfg(tmp_path)
    checkpointer = SafeCheckpointer(build_model(cfg), str(tmp_path / "out"))
    checkpointer.save("model_0000009")
    good = (tmp_path / "out" / "model_0000009.pth").read_bytes()
    monkeypatch.setattr(
        atomic_module, "open", lambda p, mode, **kw: _FullDisk(p, 100_000), raising=False
    )
    with pytest.raises(CheckpointWriteError) as info:
        checkpointer.save("model_0000019")
    message = str(info.value)
    target = str(tmp_path / "out" / "model_0000019.pth")
    assert message.startswith(f"cannot write {target}: No space left on device (ENOSPC)")
    assert message.endswith("model_0000009.pth") and "\n" not in message
    assert info.value.errno == errno.ENOSPC and info.value.filename == target
    assert isinstance(info.value.__cause__, RuntimeError)  # torch's "unexpected pos"
    assert sorted(os.listdir(tmp_path / "out")) == ["last_checkpoint", "model_0000009.pth"]
    assert (tmp_path / "out" / "last_checkpoint").read_text() == "model_0000009.pth"
    assert (tmp_path / "out" / "model_0000009.pth").read_bytes() == good


_DRIVER = textwrap.dedent("""
    import sys
    import san_det
    from tests.helpers.coco_files import register_coco_dataset, simple_images
    from tests.helpers.tiny_detection import tiny_retinanet_cfg
    from tests.helpers.scripts import load_script

    data, out, config = sys.argv[1:4]
    register_coco_dataset("disk_full_train", data, simple_images(4))
    cfg = tiny_retinanet_cfg(out, ("disk_full_train",), max_iter=2)
    open(config, "w").write(cfg.dump())
    load_script("train_net.py").cli(["--config-file", config])
    """)


@pytest.mark.slow
def test_train_net_on_a_full_disk_reports_one_line(tmp_path):
    """A file size limit (what a user without root can set) makes the checkpoint write fail."""
    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER)
    limit = 600_000  # the 1.3 MB checkpoint does not fit; config.yaml, log.txt, metrics do

    def limit_file_size():
        resource.setrlimit(
            resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1])
        )

    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            str(driver),
            str(tmp_path / "data"),
            str(out),
            str(tmp_path / "c.yaml"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=limit_file_size,
        env=child_env(helpers=True),
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = error_lines(proc.stderr)
    assert errors == [
        f"train_net.py: error: cannot write {out / 'model_final.pth'}: File too large (EFBIG); "
        "it was not written, the last complete checkpoint is none"
    ], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    assert "unexpected pos" not in proc.stderr + proc.stdout
    # no temporary left (the run's OUTPUT_DIR lock file stays by design, see engine/output_lock.py)
    assert not any(name.startswith(".") and name != LOCK_FILE_NAME for name in os.listdir(out))
    assert not (out / "last_checkpoint").exists()


# ------------------------------------------------------------------------ no detections at all
def test_no_detection_at_all_scores_ap_zero_with_a_warning(tmp_path, caplog):
    name = register_coco_dataset("nodet_val", str(tmp_path / "data"), simple_images(3))
    evaluator = COCOEvaluatorNoDetectionsIsZero(
        name,
        tasks=("bbox",),
        output_dir=str(tmp_path / "eval"),
        use_fast_impl=False,
        no_detections_hint="check the threshold",
    )
    evaluator.reset()
    for image_id in (1, 2, 3):
        empty = Instances(
            (64, 64),
            pred_boxes=Boxes(torch.zeros(0, 4)),
            scores=torch.zeros(0),
            pred_classes=torch.zeros(0, dtype=torch.long),
        )
        evaluator.process([{"image_id": image_id}], [{"instances": empty}])
    with caplog.at_level(logging.WARNING):
        results = evaluator.evaluate()
    assert results["bbox"] == {m: 0.0 for m in ("AP", "AP50", "AP75", "APs", "APm", "APl")}
    assert "no detection on nodet_val: every bbox AP is 0 (check the threshold)" in caplog.text
