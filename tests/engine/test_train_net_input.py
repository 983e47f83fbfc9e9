"""train_net.py reports bad input in one line (exit status 2) and writes nothing."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
R50 = str(ROOT / "configs/COCO-Detection/retinanet_R_50_FPN_1x.yaml")


def _load_train_net():
    spec = importlib.util.spec_from_file_location("train_net", ROOT / "train_net.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_net = _load_train_net()


class Result:
    def __init__(self, returncode, stderr):
        self.returncode, self.stderr = returncode, stderr


def cli_in_process(capsys, *args):
    """Run train_net's command line in this process (fast); returns exit status and stderr."""
    with pytest.raises(SystemExit) as exit_info:
        train_net.cli(list(args))
    return Result(exit_info.value.code, capsys.readouterr().err)


def run_train_net(*args, env=None):
    full_env = dict(os.environ, **(env or {}))
    proc = subprocess.run(
        [sys.executable, "train_net.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=full_env,
        timeout=120,
    )
    return proc


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("train_net.py: error:")]
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@pytest.mark.parametrize(
    "args, fragments",
    [
        ([], ["--config-file is required"]),
        (["--config-file", R50, "MODEL.NO_SUCH_KEY", "1"], ["Non-existent", "MODEL.NO_SUCH_KEY"]),
        (["--config-file", R50, "SOLVER.MAX_ITER", "abc"], ["SOLVER.MAX_ITER"]),
        (["--config-file", R50, "SOLVER.MAX_ITER"], ["KEY VALUE"]),
        (["--config-file", R50, "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "/nope.pth"], ["/nope.pth"]),
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


def test_missing_coco_names_expected_path(tmp_path):
    proc = run_train_net(
        "--config-file", R50, "MODEL.DEVICE", "cpu", "OUTPUT_DIR", str(tmp_path / "out"),
        env={"DETECTRON2_DATASETS": str(tmp_path / "datasets")},
    )
    assert_one_line_error(proc, "coco_2017", str(tmp_path / "datasets"), "DETECTRON2_DATASETS")
    assert not (tmp_path / "out").exists()


def test_unwritable_output_dir(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    proc = cli_in_process(capsys, "--config-file", R50, "MODEL.DEVICE", "cpu", "OUTPUT_DIR", str(blocker / "x"))
    assert_one_line_error(proc, "OUTPUT_DIR", str(blocker / "x"))


def test_cuda_device_without_gpu(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: MODEL.DEVICE cuda is valid")
    proc = cli_in_process(capsys, "--config-file", R50, "OUTPUT_DIR", str(tmp_path / "out"))
    assert_one_line_error(proc, "MODEL.DEVICE", "cpu")


def test_missing_config_file_from_the_shell(tmp_path):
    proc = run_train_net("--config-file", "configs/no_such.yaml", "OUTPUT_DIR", str(tmp_path / "o"))
    assert_one_line_error(proc, "config file not found", "no_such.yaml")
