"""train_net.py reports bad input in one line (exit status 2) and writes nothing."""

import os
import subprocess
import sys

import pytest

from tests.helpers.paths import REPO_ROOT
from tests.helpers.scripts import CliResult, assert_one_line_error
from tests.helpers.scripts import cli_in_process as run_cli
from tests.helpers.scripts import drop_closed_log_handlers, load_script

R50 = str(REPO_ROOT / "configs/COCO-Detection/retinanet_R_50_FPN_1x.yaml")


train_net = load_script("train_net.py")


@pytest.fixture(autouse=True)
def _no_launch(monkeypatch):
    """Every case here is bad input: one that got through would start a training run.
    (Also: no handler left on a closed stream by earlier tests prints into stderr.)"""
    drop_closed_log_handlers()

    def launch(*args, **kwargs):
        pytest.fail("check_input let the input through: training would start")

    monkeypatch.setattr(train_net, "launch", launch)


def cli_in_process(capsys, *args):
    """Run train_net's command line in this process (fast); returns exit status and stderr."""
    return run_cli(train_net, capsys, *args)


def run_train_net(*args, env=None):
    full_env = dict(os.environ, **(env or {}))
    proc = subprocess.run(
        [sys.executable, "train_net.py", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        env=full_env,
        timeout=120,
    )
    return proc


@pytest.mark.parametrize(
    "args, fragments",
    [
        ([], ["--config-file is required"]),
        (["--config-file", R50, "MODEL.NO_SUCH_KEY", "1"], ["Non-existent", "MODEL.NO_SUCH_KEY"]),
        (["--config-file", R50, "SOLVER.MAX_ITER", "abc"], ["SOLVER.MAX_ITER"]),
        (["--config-file", R50, "SOLVER.MAX_ITER"], ["KEY VALUE"]),
        (
            ["--config-file", R50, "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "/nope.pth"],
            ["/nope.pth"],
        ),
    ],
)
def test_bad_arguments(args, fragments, tmp_path, capsys):
    proc = cli_in_process(capsys, *args, "OUTPUT_DIR", str(tmp_path / "out"))
    assert_one_line_error(proc, *fragments)
    assert not (tmp_path / "out").exists()


def test_unknown_key_in_config_file(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(f'_BASE_: "{R50}"\nMODEL:\n  BOGUS_KEY: 1\n')
    proc = cli_in_process(capsys, "--config-file", str(cfg), "OUTPUT_DIR", str(tmp_path / "out"))
    assert_one_line_error(proc, "MODEL.BOGUS_KEY", str(cfg))


@pytest.mark.slow
def test_missing_coco_names_expected_path(tmp_path):
    proc = run_train_net(
        "--config-file",
        R50,
        "MODEL.DEVICE",
        "cpu",
        "OUTPUT_DIR",
        str(tmp_path / "out"),
        env={"DETECTRON2_DATASETS": str(tmp_path / "datasets")},
    )
    assert_one_line_error(proc, "coco_2017", str(tmp_path / "datasets"), "DETECTRON2_DATASETS")
    assert not (tmp_path / "out").exists()


def test_unwritable_output_dir(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    proc = cli_in_process(
        capsys, "--config-file", R50, "MODEL.DEVICE", "cpu", "OUTPUT_DIR", str(blocker / "x")
    )
    assert_one_line_error(proc, "OUTPUT_DIR", str(blocker / "x"))


def test_cuda_device_without_gpu(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: MODEL.DEVICE cuda is valid")
    proc = cli_in_process(capsys, "--config-file", R50, "OUTPUT_DIR", str(tmp_path / "out"))
    assert_one_line_error(proc, "MODEL.DEVICE", "cpu")


@pytest.mark.slow
def test_missing_config_file_from_the_shell(tmp_path):
    proc = run_train_net("--config-file", "configs/no_such.yaml", "OUTPUT_DIR", str(tmp_path / "o"))
    assert_one_line_error(proc, "config file not found", "no_such.yaml")


# ------------------------------------------------------------------------------------------------
# Config values the model, the solver or the input pipeline cannot use: refused by check_input
# (model built on the meta device, smallest inputs probed) before the output folder exists.
# ------------------------------------------------------------------------------------------------
DEMO = str(REPO_ROOT / "configs/Demo/shapes_retinanet.yaml")
SAN10 = str(REPO_ROOT / "configs/COCO-Detection/retinanet_san10_pairwise.yaml")
ATTENTION_HEAD = str(REPO_ROOT / "configs/COCO-Detection/retinanet_sasa50_attention_fpn_head.yaml")
CLASSIFIER = str(REPO_ROOT / "configs/ImageNet/embedded_cpu_demo.yaml")
CPU = ["MODEL.DEVICE", "cpu"]

# fmt: off
CONFIG_CASES = [
    # SASA keys
    (DEMO, ["MODEL.SASA.KERNEL_SIZE", "4"], ["MODEL.SASA.KERNEL_SIZE must be odd, got 4"]),
    (DEMO, ["MODEL.SASA.KERNEL_SIZE", "0"], ["MODEL.SASA.KERNEL_SIZE must be an odd positive"]),
    (DEMO, ["MODEL.SASA.KERNEL_SIZE", "-3"], ["MODEL.SASA.KERNEL_SIZE", "-3"]),
    (DEMO, ["MODEL.SASA.NUM_HEADS", "3"], ["MODEL.SASA.NUM_HEADS=3 must divide"]),
    (DEMO, ["MODEL.SASA.NUM_HEADS", "0"], ["MODEL.SASA.NUM_HEADS must be a positive int"]),
    (DEMO, ["MODEL.SASA.DEPTH", "34"], ["MODEL.SASA.DEPTH must be one of"]),
    (DEMO, ["MODEL.SASA.NORM", "LN"], ["MODEL.SASA.NORM must be one of"]),
    (DEMO, ["MODEL.SASA.STEM", "attention", "MODEL.SASA.STEM_NUM_HEADS", "3"],
     ["MODEL.SASA.STEM_NUM_HEADS=3"]),
    # solver
    (DEMO, ["SOLVER.IMS_PER_BATCH", "0"], ["SOLVER.IMS_PER_BATCH", "got 0"]),
    (DEMO, ["SOLVER.IMS_PER_BATCH", "-1"], ["SOLVER.IMS_PER_BATCH", "got -1"]),
    (DEMO, ["SOLVER.CHECKPOINT_PERIOD", "0"], ["SOLVER.CHECKPOINT_PERIOD must be >= 1"]),
    (DEMO, ["SOLVER.MAX_ITER", "-1"], ["SOLVER.MAX_ITER must be >= 0"]),
    # head
    (DEMO, ["MODEL.RETINANET.NUM_CLASSES", "0"], ["MODEL.RETINANET.NUM_CLASSES must be >= 1"]),
    (R50, CPU + ["MODEL.RETINANET.NUM_CLASSES", "0"], ["MODEL.RETINANET.NUM_CLASSES"]),
    (DEMO, ["MODEL.RETINANET.HEAD_NAME", "NoSuchHead"], ["MODEL.RETINANET.HEAD_NAME must be"]),
    (ATTENTION_HEAD, CPU + ["MODEL.RETINANET.ATTENTION_NUM_HEADS", "5"],
     ["MODEL.RETINANET.ATTENTION_NUM_HEADS=5 must divide"]),
    (ATTENTION_HEAD, CPU + ["MODEL.RETINANET.ATTENTION_KERNEL_SIZE", "6"],
     ["MODEL.RETINANET.ATTENTION_KERNEL_SIZE must be odd"]),
    # FPN
    (ATTENTION_HEAD, CPU + ["MODEL.FPN.ATTENTION_NUM_HEADS", "3"],
     ["MODEL.FPN.ATTENTION_NUM_HEADS=3 must divide"]),
    (ATTENTION_HEAD, CPU + ["MODEL.FPN.ATTENTION_KERNEL_SIZE", "0"],
     ["MODEL.FPN.ATTENTION_KERNEL_SIZE must be an odd positive"]),
    (ATTENTION_HEAD, CPU + ["MODEL.FPN.TOP_BLOCK_IN_FEATURE", "c5"],
     ["MODEL.FPN.TOP_BLOCK_IN_FEATURE must be one of"]),
    (DEMO, ["MODEL.FPN.IN_FEATURES", "['res3', 'res6']"], ["MODEL.FPN.IN_FEATURES", "res6"]),
    # SAN keys
    (SAN10, CPU + ["MODEL.SAN.DEPTH", "26"], ["MODEL.SAN.DEPTH must be one of [10, 15, 19]"]),
    (SAN10, CPU + ["MODEL.SAN.SA_TYPE", "pointwise"], ["MODEL.SAN.SA_TYPE must be one of"]),
    (SAN10, CPU + ["MODEL.SAN.RELATION", "star"], ["MODEL.SAN.RELATION for pairwise SAN"]),
    (SAN10, CPU + ["MODEL.SAN.PAD_MODE", "circular"], ["MODEL.SAN.PAD_MODE must be one of"]),
    (SAN10, CPU + ["MODEL.SAN.KERNELS", "[3, 7, 6, 7, 7]"], ["MODEL.SAN.KERNELS entries"]),
    (SAN10, CPU + ["MODEL.SAN.BASE_WIDTH", "24"], ["MODEL.SAN.BASE_WIDTH must be a positive"]),
    (SAN10, CPU + ["MODEL.SAN.SHARE_PLANES", "3"], ["MODEL.SAN.SHARE_PLANES=3 must divide"]),
    (SAN10, CPU + ["MODEL.SAN.NORM", "IN"], ["MODEL.SAN.NORM must be one of"]),
    # registries
    (DEMO, ["MODEL.META_ARCHITECTURE", "NoSuchNet"], ["MODEL.META_ARCHITECTURE 'NoSuchNet'"]),
    (DEMO, ["MODEL.BACKBONE.NAME", "build_no_backbone"], ["build_no_backbone"]),
    # input sizes
    (DEMO, ["INPUT.MIN_SIZE_TRAIN", "(-5,)"], ["INPUT.MIN_SIZE_TRAIN must list sizes >= 0"]),
    (DEMO, ["INPUT.MAX_SIZE_TEST", "0"], ["INPUT.MAX_SIZE_TEST must be >= 1"]),
    (DEMO, ["INPUT.MIN_SIZE_TRAIN", "(1,)", "SOLVER.IMS_PER_BATCH", "1"],
     ["cannot take training on 1x1 images", "1 per process", "Expected more than 1 value"]),
    (SAN10, CPU + ["INPUT.MIN_SIZE_TRAIN", "(64,)"],
     ["cannot take training on 64x64 images", "INPUT.MIN_SIZE_TRAIN", "MODEL.SAN.PAD_MODE"]),
    (SAN10, CPU + ["INPUT.MIN_SIZE_TEST", "96"],
     ["cannot take inference on 96x96 images", "INPUT.MIN_SIZE_TEST", "reflection padding"]),
    # classification
    (CLASSIFIER, ["SOLVER.MAX_ITER", "3"],
     ["CLASSIFICATION.SOLVER.EPOCHS 8 sets SOLVER.MAX_ITER", "(to 3)"]),
    (CLASSIFIER, ["SOLVER.WARMUP_ITERS", "5"], ["sets SOLVER.WARMUP_ITERS"]),
    (CLASSIFIER, ["CLASSIFICATION.NUM_CLASSES", "0"], ["CLASSIFICATION.NUM_CLASSES must be > 0"]),
    (CLASSIFIER, ["CLASSIFICATION.INPUT.TRAIN_CROP_SIZE", "30"],
     ["30x30 crops", "not divisible by 32"]),
    (CLASSIFIER, ["MODEL.SASA.KERNEL_SIZE", "4"], ["MODEL.SASA.KERNEL_SIZE must be odd"]),
    (CLASSIFIER, ["SOLVER.IMS_PER_BATCH", "0"], ["SOLVER.IMS_PER_BATCH"]),
]
# fmt: on


@pytest.mark.parametrize(
    "config, opts, fragments", CONFIG_CASES, ids=[" ".join(c[1][-2:]) for c in CONFIG_CASES]
)
def test_bad_config_values_are_caught_before_anything_is_written(
    config, opts, fragments, tmp_path, capsys
):
    proc = cli_in_process(capsys, "--config-file", config, *opts, "OUTPUT_DIR", str(tmp_path / "o"))
    assert_one_line_error(proc, *fragments)
    assert not (tmp_path / "o").exists()


def test_classification_epochs_without_explicit_iterations_is_accepted(tmp_path):
    """The check refuses only a conflict: EPOCHS with the iteration keys at their defaults runs."""
    from san_det.classification import ClassificationTrainer

    cfg = train_net.setup_cfg(CLASSIFIER, ["OUTPUT_DIR", str(tmp_path / "o")])
    ClassificationTrainer.check_config(cfg)
    cfg = train_net.setup_cfg(CLASSIFIER, [
        "CLASSIFICATION.SOLVER.EPOCHS", "0", "CLASSIFICATION.SOLVER.WARMUP_EPOCHS", "0",
        "CLASSIFICATION.SOLVER.EVAL_PERIOD_EPOCHS", "0",
        "CLASSIFICATION.SOLVER.CHECKPOINT_PERIOD_EPOCHS", "0", "SOLVER.MAX_ITER", "3",
        "OUTPUT_DIR", str(tmp_path / "o"),
    ])  # fmt: skip
    ClassificationTrainer.check_config(cfg)


def test_every_shipped_config_passes_the_checks(tmp_path):
    """No false alarm: every config of configs/ passes (8 processes: the smallest batch per
    process, which batch norm sees)."""
    configs = sorted(p for p in (REPO_ROOT / "configs").glob("*/*.yaml") if "Base" not in p.name)
    assert len(configs) >= 20
    for path in configs:
        cfg = train_net.setup_cfg(str(path), CPU + ["OUTPUT_DIR", str(tmp_path / "o")])
        train_net.trainer_class(cfg).check_config(cfg, world_size=8)


def test_batch_not_a_multiple_of_the_processes(tmp_path, capsys):
    out = ("OUTPUT_DIR", str(tmp_path / "o"))
    proc = cli_in_process(
        capsys, "--config-file", DEMO, "--num-processes", "2", "SOLVER.IMS_PER_BATCH", "3", *out
    )
    assert_one_line_error(proc, "SOLVER.IMS_PER_BATCH", "processes (2)", "got 3", "e.g. 4")
    proc = cli_in_process(capsys, "--config-file", CLASSIFIER, "--num-processes", "3", *out)
    assert_one_line_error(proc, "SOLVER.IMS_PER_BATCH", "processes (3)", "got 64")
    assert not (tmp_path / "o").exists()


def test_one_pixel_wide_flipped_images_map_to_tensors():
    """INPUT sizes of 1 made detectron2's mapper code fail on a flipped 1-pixel-wide image
    (numpy calls it contiguous with a negative stride, torch refuses it)."""
    import numpy as np
    from detectron2.data import transforms as T

    from san_det.data.mapper import _to_tensor

    image = np.array([[[7, 8, 9]]], dtype=np.uint8)  # a square image resized to 1x1
    flipped = T.HFlipTransform(1).apply_image(image)
    assert any(s < 0 for s in np.ascontiguousarray(flipped.transpose(2, 0, 1)).strides)
    tensor = _to_tensor(flipped.transpose(2, 0, 1))
    assert tensor.shape == (3, 1, 1) and tensor.flatten().tolist() == [7, 8, 9]
    wide = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)[:, ::-1]
    assert _to_tensor(wide.transpose(2, 0, 1)).tolist() == [
        [[3, 0], [9, 6]],
        [[4, 1], [10, 7]],
        [[5, 2], [11, 8]],
    ]


# ------------------------------------------------------------------------------------------------
# Config files, flags and MODEL.WEIGHTS
# ------------------------------------------------------------------------------------------------
def test_empty_or_non_mapping_config_files(tmp_path, capsys):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing but a comment\n")
    listing = tmp_path / "list.yaml"
    listing.write_text("- MODEL\n- SOLVER\n")
    empty_base = tmp_path / "child.yaml"
    empty_base.write_text(f'_BASE_: "{empty}"\nSEED: 1\n')
    out = ["OUTPUT_DIR", str(tmp_path / "o")]
    assert_one_line_error(
        cli_in_process(capsys, "--config-file", str(empty), *out), str(empty), "is empty"
    )
    assert_one_line_error(
        cli_in_process(capsys, "--config-file", str(listing), *out),
        str(listing),
        "KEY: value entries, not a list",
    )
    assert_one_line_error(
        cli_in_process(capsys, "--config-file", str(empty_base), *out),
        str(empty_base),
        "_BASE_ file",
        "empty",
    )
    assert_one_line_error(
        cli_in_process(capsys, "--config-file", str(tmp_path), *out), "is a folder"
    )
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flag", ["--resume", "--eval-only", "--num-gpus"])
def test_flag_after_the_overrides_says_where_flags_go(flag, tmp_path, capsys):
    proc = cli_in_process(
        capsys,
        "--config-file",
        DEMO,
        "SOLVER.MAX_ITER",
        "2",
        flag,
        "OUTPUT_DIR",
        str(tmp_path / "o"),
    )
    assert_one_line_error(proc, flag, "put flags before them")
    assert not (tmp_path / "o").exists()


def test_model_weights_naming_a_folder(tmp_path, capsys):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "model_final.pth").write_bytes(b"")
    proc = cli_in_process(
        capsys,
        "--config-file",
        DEMO,
        "--eval-only",
        "MODEL.WEIGHTS",
        str(folder),
        "OUTPUT_DIR",
        str(tmp_path / "o"),
    )
    assert_one_line_error(proc, f"MODEL.WEIGHTS {folder} is a folder", "model_final.pth")
    assert "not found" not in proc.stderr
    assert not (tmp_path / "o").exists()


def test_eval_only_needs_weights(tmp_path, capsys):
    proc = cli_in_process(
        capsys, "--config-file", DEMO, "--eval-only", "OUTPUT_DIR", str(tmp_path / "o")
    )
    assert_one_line_error(proc, "--eval-only needs trained weights", "MODEL.WEIGHTS")
    proc = cli_in_process(
        capsys, "--config-file", DEMO, "--eval-only", "--resume", "OUTPUT_DIR", str(tmp_path / "o")
    )
    assert_one_line_error(proc, "--eval-only needs trained weights", "last_checkpoint")
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------
# Tools
# ------------------------------------------------------------------------------------------------
def _run_tool(name, *args):
    return subprocess.run(
        [sys.executable, f"tools/{name}", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _tool_in_process(capsys, name, *args):
    return CliResult(load_script(f"tools/{name}").main(list(args)), capsys.readouterr().err)


@pytest.mark.slow
def test_analyze_model_bad_input_is_one_line(capsys):
    tool = "analyze_model.py"

    def analyze(config, *args):
        return _tool_in_process(capsys, tool, "--config-file", config, *args)

    proc = _run_tool(tool, "--config-file", "configs/no_such.yaml")
    assert_one_line_error(proc, "config file not found", "no_such.yaml", script=tool)
    proc = analyze(DEMO, "MODEL.SASA.KERNEL_SIZE", "4")
    assert_one_line_error(proc, "MODEL.SASA.KERNEL_SIZE must be odd", script=tool)
    proc = analyze(DEMO, "MODEL.NO_SUCH", "1")
    assert_one_line_error(proc, "MODEL.NO_SUCH", script=tool)
    proc = analyze(SAN10, "--input-size", "64", "64")
    assert_one_line_error(proc, "cannot take the input", "MODEL.SAN.PAD_MODE", script=tool)


@pytest.mark.slow
def test_convert_classifier_tool_bad_input_is_one_line(tmp_path, capsys):
    tool = "convert_classifier_to_detection.py"
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"x")
    det = str(REPO_ROOT / "configs/COCO-Detection/retinanet_sasa26.yaml")
    out = str(tmp_path / "out.pth")

    def args(config, source, output, *overrides):
        return ("--config-file", config, "--input", str(source), "--output", output, *overrides)

    proc = _run_tool(tool, *args("configs/no_such.yaml", weights, out))
    assert_one_line_error(proc, "config file not found", "no_such.yaml", script=tool)
    proc = _tool_in_process(
        capsys, tool, *args(det, weights, str(tmp_path / "missing" / "out.pth"))
    )
    assert_one_line_error(proc, str(tmp_path / "missing"), "does not exist", script=tool)
    proc = _tool_in_process(capsys, tool, *args(det, tmp_path / "nope.pth", out))
    assert_one_line_error(proc, "input not found", script=tool)
    proc = _tool_in_process(capsys, tool, *args(det, weights, out, "MODEL.SASA.NUM_HEADS", "3"))
    assert_one_line_error(proc, "MODEL.SASA.NUM_HEADS=3", script=tool)
    proc = _tool_in_process(capsys, tool, *args(det, weights, out))
    assert_one_line_error(proc, "cannot read checkpoint", str(weights), script=tool)
    assert not (tmp_path / "out.pth").exists()


def test_batch_is_checked_against_torchruns_world_size(tmp_path, capsys, monkeypatch):
    """Under torchrun the job's size comes from its environment, not from --num-processes."""
    env = {
        "RANK": "0",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": "4",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29500",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    out = str(tmp_path / "o")
    proc = cli_in_process(
        capsys, "--config-file", DEMO, "SOLVER.IMS_PER_BATCH", "6", "OUTPUT_DIR", out
    )
    assert_one_line_error(proc, "SOLVER.IMS_PER_BATCH", "processes (4)", "got 6")
    assert not (tmp_path / "o").exists()
