"""tools/predict.py's output folder: locked while a run writes it, replaced whole by a rerun,
left as it was by a signal, a kill or a full disk; skipped input files counted; a classification
config refused. Runs are the script in a child process (held inside the first prediction when a
signal is sent, :mod:`tests.helpers.held_runs`) or its ``main`` in this process."""

import json
import os
import resource
import signal
from pathlib import Path

import pytest
import torch
from detectron2.modeling import build_model

import san_det  # noqa: F401
from san_det.data.coco_example import write_coco_example
from san_det.detection.predict_output import MANIFEST
from san_det.engine.output_lock import LOCK_FILE_NAME
from tests.helpers.coco_files import write_coco_dataset
from tests.helpers.held_runs import HeldRun
from tests.helpers.paths import config_path
from tests.helpers.processes import process_alive, wait_until
from tests.helpers.scripts import load_script
from tests.helpers.tiny_detection import tiny_retinanet_cfg

predict_tool = load_script("tools/predict.py")

PREDICTOR = "san_det.detection.visualize:FilePredictor.__call__"
STOP_WITHIN_S = 60


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A config naming a COCO json, random weights, two folders of images with other names."""
    root = tmp_path_factory.mktemp("predict_output")
    example = write_coco_example(str(root / "data"), num_train=1, num_val=1, image_size=64)
    cfg = tiny_retinanet_cfg(str(root / "train_out"))
    cfg.DATASETS.COCO_INSTANCES = [["po_val", *example["val"]]]
    cfg.DATASETS.TEST = ("po_val",)
    cfg.MODEL.RETINANET.NUM_CLASSES = 4
    torch.manual_seed(0)
    torch.save({"model": build_model(cfg).state_dict()}, root / "model.pth")
    cfg.MODEL.WEIGHTS = str(root / "model.pth")
    (root / "model.yaml").write_text(cfg.dump())
    for folder, names in (("first", ["a", "b", "c"]), ("second", ["x", "y"])):
        images = [{"name": f"{n}.png", "size": (48, 40), "boxes": [[4, 4, 20, 16]]} for n in names]
        write_coco_dataset(str(root / folder), images)
        os.remove(root / folder / "annotations.json")
    return root


def _main(capsys, setup, *args):
    code = predict_tool.main(["--config-file", str(setup / "model.yaml"), *args])
    return code, capsys.readouterr()


def _held(setup, tmp_path, inputs, out, **kwargs):
    return HeldRun(
        tmp_path / "logs", "tools/predict.py", "--config-file", str(setup / "model.yaml"),
        "--input", str(inputs), "--output", str(out), hold_at=PREDICTOR, **kwargs,
    )  # fmt: skip


def _snapshot(folder):
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(Path(folder).rglob("*"))
        if p.is_file() and p.name != LOCK_FILE_NAME
    }


def _staging(folder):
    return [p for p in Path(folder).iterdir() if p.name not in (LOCK_FILE_NAME, MANIFEST)
            and p.name.startswith(".")]  # fmt: skip


def _drawings(folder):
    return sorted(p.name for p in Path(folder).glob("*.png"))


def test_a_rerun_replaces_the_whole_previous_prediction(setup, tmp_path, capsys, caplog):
    out = tmp_path / "pred"
    assert _main(capsys, setup, "--input", str(setup / "first"), "--output", str(out))[0] == 0
    assert _drawings(out) == ["a.png", "b.png", "c.png"]
    code, captured = _main(capsys, setup, "--input", str(setup / "second"), "--output", str(out))
    assert code == 0, captured.err
    assert f"Replacing the previous prediction in {out} (5 files)" in caplog.text
    assert _drawings(out) == ["x.png", "y.png"]  # no drawing of the first run is kept
    listed = [im["drawing"] for im in json.loads((out / "images.json").read_text())["images"]]
    assert listed == ["x.png", "y.png"]
    assert _staging(out) == []


def test_a_folder_with_other_files_is_refused_and_kept(setup, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "photo.png").write_bytes(b"also mine")
    code, captured = _main(capsys, setup, "--input", str(setup / "first"), "--output", str(out))
    assert code == 2
    errors = [line for line in captured.err.splitlines() if line.startswith("predict.py: error:")]
    assert len(errors) == 1 and "holds files that tools/predict.py did not write" in errors[0]
    assert "Traceback" not in captured.err
    assert sorted(os.listdir(out)) == ["notes.txt", "photo.png"]


def test_skipped_files_are_counted_in_one_warning(setup, tmp_path, capsys, caplog):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("a.png", "b.png"):
        (inputs / name).write_bytes((setup / "first" / name).read_bytes())
    for name in ("anim.gif", "other.GIF", "readme.txt"):
        (inputs / name).write_bytes(b"GIF89a")
    code, captured = _main(capsys, setup, "--input", str(inputs), "--output", str(tmp_path / "o"))
    assert code == 0, captured.err
    warnings = [r.getMessage() for r in caplog.records if "Skipped" in r.getMessage()]
    assert len(warnings) == 1, caplog.text
    assert "Skipped 3 file(s)" in warnings[0] and "2 .gif, 1 .txt" in warnings[0]
    assert _drawings(tmp_path / "o") == ["a.png", "b.png"]


def test_a_classification_config_is_one_line(setup, tmp_path, capsys):
    config = config_path("ImageNet", "sasa26.yaml")
    code = predict_tool.main(
        ["--config-file", config, "--input", str(setup / "first"), "--output", str(tmp_path / "o"),
         "MODEL.DEVICE", "cpu"]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 2, captured.err
    errors = [line for line in captured.err.splitlines() if line.startswith("predict.py: error:")]
    assert len(errors) == 1 and "is a classification config" in errors[0], captured.err
    assert "Traceback" not in captured.err and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_two_runs_into_one_folder(setup, tmp_path, capsys):
    out = tmp_path / "pred"
    first = _held(setup, tmp_path, setup / "first", out)
    pid = first.wait_held()[0]
    code, captured = _main(capsys, setup, "--input", str(setup / "second"), "--output", str(out))
    assert code == 2
    errors = [line for line in captured.err.splitlines() if line.startswith("predict.py: error:")]
    assert len(errors) == 1, captured.err
    assert errors[0].startswith(f"predict.py: error: --output {out} is in use by another run")
    assert f"pid {pid}" in errors[0]
    first.release()
    assert first.wait() == 0, first.output()[-3000:]
    assert _drawings(out) == ["a.png", "b.png", "c.png"]
    listed = [im["drawing"] for im in json.loads((out / "images.json").read_text())["images"]]
    assert listed == ["a.png", "b.png", "c.png"] and _staging(out) == []


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_leaves_the_folder_as_it_was(setup, tmp_path, capsys, signum):
    out = tmp_path / "pred"
    assert _main(capsys, setup, "--input", str(setup / "first"), "--output", str(out))[0] == 0
    before = _snapshot(out)
    run = _held(setup, tmp_path, setup / "second", out)
    run.wait_held()
    run.signal_group(signum)
    assert run.wait(STOP_WITHIN_S) == 128 + signum, run.output()[-3000:]
    name = signal.Signals(signum).name
    message = f"stopped by {name} during the prediction; {out} keeps what it held before"
    run.assert_only_line("predict.py:", f"predict.py: {message}")
    assert _snapshot(out) == before and _staging(out) == []
    # into a new folder: nothing at all is left
    run = _held(setup, tmp_path, setup / "second", tmp_path / "new")
    run.wait_held()
    run.signal_group(signum)
    assert run.wait(STOP_WITHIN_S) == 128 + signum, run.output()[-3000:]
    assert not (tmp_path / "new").exists()


@pytest.mark.slow
def test_the_staging_folder_of_a_killed_run_is_removed_by_the_next(setup, tmp_path, capsys):
    out = tmp_path / "pred"
    run = _held(setup, tmp_path, setup / "first", out)
    pid = run.wait_held()[0]
    run.kill()
    assert wait_until(lambda: not process_alive(pid))
    assert len(_staging(out)) == 1  # SIGKILL: nothing could clean up
    code, captured = _main(capsys, setup, "--input", str(setup / "second"), "--output", str(out))
    assert code == 0, captured.err
    assert _staging(out) == [] and _drawings(out) == ["x.png", "y.png"]


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_keeps_the_previous_prediction(setup, tmp_path, capsys):
    out = tmp_path / "pred"
    assert _main(capsys, setup, "--input", str(setup / "first"), "--output", str(out))[0] == 0
    before = _snapshot(out)

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))  # smaller than a drawing

    run = HeldRun(
        tmp_path / "logs", "tools/predict.py", "--config-file", str(setup / "model.yaml"),
        "--input", str(setup / "second"), "--output", str(out), preexec_fn=limit_file_size,
    )  # fmt: skip
    assert run.wait() == 1, run.output()[-3000:]
    message = f"cannot write into {out}: File too large; it keeps what it held before"
    run.assert_only_line("predict.py: error:", f"predict.py: error: {message}")
    assert _snapshot(out) == before and _staging(out) == []
