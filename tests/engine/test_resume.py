"""Crash-safe resume: SIGKILL after a checkpoint and while writing one, then --resume; corrupt and
mismatched checkpoints give errors naming the file and the first mismatched key."""

import subprocess
import sys

import pytest
import torch
from detectron2.modeling import build_model

import san_det  # noqa: F401
from san_det.detection import DetectionTrainer
from san_det.engine import CheckpointError, SafeCheckpointer
from tests.helpers.coco_files import register_coco_dataset, simple_images
from tests.helpers.paths import REPO_ROOT
from tests.helpers.scripts import child_env, error_lines, load_script
from tests.helpers.tiny_detection import tiny_retinanet_cfg, tiny_test_net_cfg, train_tiny_retinanet

_DRIVER = """
import io, os, signal, sys
sys.path.insert(0, {root!r})
import san_det
from tests.helpers.coco_files import register_coco_dataset
register_coco_dataset("resume_train", {folder!r})
import torch

kill_after = os.environ.get("KILL_AFTER_SAVE")      # a checkpoint name: die right after it
kill_during = os.environ.get("KILL_DURING_SAVE")    # an iteration: die half-way through writing
real_save = torch.save

def save(obj, f, *args, **kwargs):
    dying = kill_during is not None and isinstance(obj, dict)
    if dying and obj.get("iteration") == int(kill_during):
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        data = buf.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)

torch.save = save
if kill_after:
    from san_det.engine.checkpoint import SafeCheckpointer
    real = SafeCheckpointer.save
    def checkpoint_then_die(self, name, **kwargs):
        real(self, name, **kwargs)
        if name == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    SafeCheckpointer.save = checkpoint_then_die

import train_net
train_net.cli(sys.argv[1:])
"""


def _write_inputs(tmp_path):
    folder = tmp_path / "data"
    register_coco_dataset("resume_train", str(folder), simple_images(8, seed=1))
    cfg = tiny_retinanet_cfg("unused", ("resume_train",), max_iter=6)
    cfg.SOLVER.CHECKPOINT_PERIOD = 2
    cfg.DATALOADER.NUM_WORKERS = 2
    cfg.SEED = 5
    (tmp_path / "tiny.yaml").write_text(cfg.dump())
    (tmp_path / "driver.py").write_text(_DRIVER.format(root=str(REPO_ROOT), folder=str(folder)))


def _run(tmp_path, out, *extra, env=None):
    return subprocess.run(
        [
            sys.executable,
            str(tmp_path / "driver.py"),
            "--config-file",
            str(tmp_path / "tiny.yaml"),
            *extra,
            "OUTPUT_DIR",
            str(out),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=child_env(**(env or {})),
    )


def _weights(path):
    return torch.load(path, map_location="cpu")["model"]


@pytest.mark.slow
def test_sigkill_and_resume_give_the_uninterrupted_weights(tmp_path):
    _write_inputs(tmp_path)
    straight, killed = tmp_path / "straight", tmp_path / "killed"

    proc = _run(tmp_path, straight)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # 1. Killed right after the checkpoint of iteration 1.
    proc = _run(tmp_path, killed, env={"KILL_AFTER_SAVE": "model_0000001"})
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert (killed / "last_checkpoint").read_text() == "model_0000001.pth"

    # 2. Resumed, then killed half-way through writing the checkpoint of iteration 3.
    proc = _run(tmp_path, killed, "--resume", env={"KILL_DURING_SAVE": "3"})
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert (killed / "last_checkpoint").read_text() == "model_0000001.pth"
    assert not (killed / "model_0000003.pth").exists()
    partial = list(killed.glob(".model_0000003.pth.tmp-*"))
    assert len(partial) == 1 and partial[0].stat().st_size > 0  # it died while writing

    # 3. Resumed to the end.
    proc = _run(tmp_path, killed, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (killed / "log.txt").read_text()
    assert "Starting training from iteration 2" in log
    assert not list(killed.glob(".*.tmp-*"))  # the dead process's temporary file is gone

    final, expected = _weights(killed / "model_final.pth"), _weights(straight / "model_final.pth")
    assert final.keys() == expected.keys()
    for k in expected:
        assert torch.equal(final[k], expected[k]), k
    at_kill = _weights(killed / "model_0000001.pth")
    assert any(not torch.equal(at_kill[k], final[k]) for k in final)  # it did train on


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny RetinaNet trained for 2 iterations, with its checkpoint folder."""
    root = tmp_path_factory.mktemp("ckpt")
    return root, train_tiny_retinanet(str(root), "ckpt_train", max_iter=2)


def test_atomic_save_leaves_no_temporary_and_tags_last(trained):
    root, _ = trained
    out = root / "out"
    assert (out / "last_checkpoint").read_text() == "model_final.pth"
    assert not list(out.glob(".*tmp*"))
    ckpt = torch.load(out / "model_final.pth", map_location="cpu")
    assert ckpt["iteration"] == 1 and ckpt["data_stream"]["seed"] == 0
    assert "optimizer" in ckpt["trainer"]["_trainer"]
    assert ckpt["model_running_state"][""]["loss_normalizer"] != 100  # RetinaNet's EMA


def test_truncated_checkpoint_names_the_file(trained, tmp_path):
    root, cfg = trained
    out = tmp_path / "out"
    out.mkdir()
    data = (root / "out" / "model_final.pth").read_bytes()
    (out / "model_final.pth").write_bytes(data[: len(data) // 3])
    (out / "last_checkpoint").write_text("model_final.pth")
    cfg = cfg.clone()
    cfg.OUTPUT_DIR = str(out)
    trainer = DetectionTrainer(cfg)
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*model_final.pth"):
        trainer.resume_or_load(resume=True)


def test_train_net_reports_a_truncated_checkpoint_in_one_line(trained, tmp_path, capsys):
    root, cfg = trained
    out = tmp_path / "out"
    out.mkdir()
    data = (root / "out" / "model_final.pth").read_bytes()
    (out / "model_final.pth").write_bytes(data[:1000])
    (out / "last_checkpoint").write_text("model_final.pth")
    (tmp_path / "tiny.yaml").write_text(cfg.dump())
    train_net = load_script("train_net.py")
    with pytest.raises(SystemExit) as info:
        train_net.cli(
            ["--config-file", str(tmp_path / "tiny.yaml"), "--resume", "OUTPUT_DIR", str(out)]
        )
    assert info.value.code == 2
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and str(out / "model_final.pth") in errors[0], errors


def test_last_checkpoint_naming_a_missing_file(trained, tmp_path):
    _, cfg = trained
    cfg = cfg.clone()
    cfg.OUTPUT_DIR = str(tmp_path)
    (tmp_path / "last_checkpoint").write_text("model_0000099.pth")
    with pytest.raises(CheckpointError, match="model_0000099.pth, which does not exist"):
        DetectionTrainer(cfg).resume_or_load(resume=True)


def _model(cfg, **changes):
    cfg = cfg.clone()
    for key, value in changes.items():
        node = cfg
        *path, last = key.split(".")
        for p in path:
            node = getattr(node, p)
        setattr(node, last, value)
    return build_model(cfg)


def test_resume_from_another_architecture_names_the_first_mismatched_key(trained, tmp_path):
    root, cfg = trained
    src = str(root / "out" / "model_final.pth")
    # Other number of classes: a shape mismatch.
    ckpt = SafeCheckpointer(_model(cfg, **{"MODEL.RETINANET.NUM_CLASSES": 5}))
    with pytest.raises(CheckpointError) as info:
        ckpt.load(src, strict=True)
    assert src in str(info.value) and "'head.cls_score.weight'" in str(info.value)
    # More head convs: tensors missing from the checkpoint.
    ckpt = SafeCheckpointer(_model(cfg, **{"MODEL.RETINANET.NUM_CONVS": 2}))
    with pytest.raises(CheckpointError) as info:
        ckpt.load(src, strict=True)
    msg = str(info.value)
    assert src in msg and "'head.cls_subnet.2.weight'" in msg and "not in the checkpoint" in msg


def test_model_weights_mismatch_is_an_error_unless_allowed(trained):
    root, cfg = trained
    src = str(root / "out" / "model_final.pth")
    model = _model(cfg, **{"MODEL.RETINANET.NUM_CLASSES": 5})
    with pytest.raises(CheckpointError, match="'head.cls_score.weight' has shape"):
        SafeCheckpointer(model).resume_or_load(src, resume=False)
    before = model.head.cls_score.weight.detach().clone()
    SafeCheckpointer(model, allow_shape_mismatch=True).resume_or_load(src, resume=False)
    assert torch.equal(model.head.cls_score.weight, before)  # kept its initial value
    loaded = torch.load(src, map_location="cpu")["model"]
    assert torch.equal(model.head.bbox_pred.weight, loaded["head.bbox_pred.weight"])


def test_model_weights_of_an_unrelated_model(trained, tmp_path):
    _, cfg = trained
    other = build_model(tiny_test_net_cfg(str(tmp_path)))
    path = tmp_path / "other.pth"
    torch.save({"model": other.state_dict()}, path)
    with pytest.raises(CheckpointError, match=f"{path} has no tensor in common"):
        SafeCheckpointer(build_model(cfg)).resume_or_load(str(path), resume=False)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*junk.pth"):
        SafeCheckpointer(build_model(cfg)).resume_or_load(str(tmp_path / "junk.pth"), resume=False)


def test_random_seed_is_stored_and_restored_on_resume(trained, tmp_path):
    _, cfg = trained
    cfg = cfg.clone()
    cfg.SEED = -1
    cfg.OUTPUT_DIR = str(tmp_path)
    cfg.SOLVER.MAX_ITER = 1
    first = DetectionTrainer(cfg)
    first.resume_or_load(resume=False)
    first.train()
    second = DetectionTrainer(cfg)  # draws another random seed ...
    second.resume_or_load(resume=True)  # ... and takes the checkpoint's
    assert second.seed == first.seed


def test_eval_only_with_a_mismatched_checkpoint_is_a_one_line_error(trained, tmp_path, capsys):
    root, cfg = trained
    cfg = cfg.clone()
    cfg.MODEL.RETINANET.NUM_CONVS = 2
    (tmp_path / "tiny.yaml").write_text(cfg.dump())
    train_net = load_script("train_net.py")
    weights = str(root / "out" / "model_final.pth")
    with pytest.raises(SystemExit) as info:
        train_net.cli(
            [
                "--config-file",
                str(tmp_path / "tiny.yaml"),
                "--eval-only",
                "MODEL.WEIGHTS",
                weights,
                "OUTPUT_DIR",
                str(tmp_path / "out"),
            ]
        )
    assert info.value.code == 2
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and weights in errors[0], errors
    assert "'head.cls_subnet.2.weight'" in errors[0], errors
