"""san_det.compat: detectron2 0.6 imports and runs on today's stack; no-op with a full build."""

import importlib
import os
import random
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import san_det  # noqa: F401  (applies the compatibility patches)
from san_det import compat

needs_shim = pytest.mark.skipif(
    compat.HAS_DETECTRON2_EXTENSION, reason="full detectron2 with its C++ extension installed"
)
from tests.helpers.paths import REPO_ROOT


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
        "detectron2.export",
        "detectron2.utils.analysis",
    ],
)
def test_detectron2_modules_import(module):
    assert importlib.import_module(module) is not None


def test_environment_report_runs():
    from detectron2.utils.collect_env import collect_env_info

    report = collect_env_info()
    assert "detectron2" in report and "PyTorch" in report


@needs_shim
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


# --------------------------------------------- detectron2 0.6's own test suite found these
@needs_shim
def test_caffe2_export_says_caffe2_is_missing_and_the_rest_of_export_works():
    import detectron2.export as export
    from detectron2.export import dump_torchscript_IR, scripting_with_instances  # noqa: F401
    from detectron2.utils.analysis import FlopCountAnalysis

    with pytest.raises(compat.Caffe2UnavailableError, match="Caffe2Tracer needs caffe2"):
        export.Caffe2Tracer(None, None, None)
    # FLOP counting (through TracingAdapter) and tracing run.
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    x = torch.rand(1, 3, 8, 8)
    flops = FlopCountAnalysis(model, (x,))
    assert flops.total() == 4 * 3 * 9 * 6 * 6
    traced = torch.jit.trace(export.TracingAdapter(model, (x,)), (x,))
    torch.testing.assert_close(traced(x)[0], model(x))


@needs_shim
def test_map_dataset_retries_a_skipped_image_with_repeat_factor_sampler(tmp_path):
    """detectron2's own loader and sampler, san_det's mapper skipping an unreadable image."""
    from detectron2.data import build_detection_train_loader, common

    from san_det.data.mapper import RobustDatasetMapper
    from tests.helpers.coco_files import register_coco_dataset
    from tests.helpers.tiny_detection import tiny_retinanet_cfg

    box = [[8.0, 8.0, 20.0, 20.0]]
    images = [{"name": "good.png", "boxes": box},
              {"name": "bad.jpg", "boxes": box, "broken": "truncated"}]  # fmt: skip
    register_coco_dataset("compat_repeat_factor", str(tmp_path / "data"), images)
    cfg = tiny_retinanet_cfg(str(tmp_path / "out"), ("compat_repeat_factor",))
    cfg.DATALOADER.SAMPLER_TRAIN = "RepeatFactorTrainingSampler"
    cfg.DATALOADER.REPEAT_THRESHOLD = 1.0
    cfg.DATALOADER.SKIP_CORRUPT_IMAGES = True
    mapper = RobustDatasetMapper(cfg, is_train=True)
    loader = iter(build_detection_train_loader(cfg, mapper=mapper))
    seen = [d["file_name"] for _ in range(4) for d in next(loader)]
    assert len(seen) == 8 and all(f.endswith("good.png") for f in seen)
    if sys.version_info >= (3, 11):  # without the patch: random.sample of a set, a TypeError
        dataset = common.MapDataset([None, None], lambda d: d)
        unpatched = random.Random()
        unpatched.setstate(dataset._rng.getstate())
        with pytest.raises(TypeError):
            unpatched.sample(dataset._fallback_candidates, k=1)
        assert dataset._rng.sample(dataset._fallback_candidates, k=1)[0] in (0, 1)


class _LinearRegression(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(2, 1)

    def forward(self, batch):
        return {"loss": ((self.linear(batch[0]) - batch[1]) ** 2).mean()}


def _trainer_with_torch_scheduler():
    from detectron2.engine import SimpleTrainer, hooks

    torch.manual_seed(0)
    model = _LinearRegression()
    data = [(torch.randn(4, 2), torch.randn(4, 1))] * 100
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    trainer = SimpleTrainer(model, data, optimizer)
    trainer.register_hooks([hooks.LRScheduler(optimizer, scheduler)])
    return trainer, scheduler


def test_lr_scheduler_hook_checkpoints_torch_schedulers(tmp_path):
    """detectron2's LRScheduler hook saves and restores torch's own schedulers on resume."""
    from detectron2.checkpoint import DetectionCheckpointer

    assert not isinstance(
        torch.optim.lr_scheduler.StepLR(torch.optim.SGD([torch.zeros(1)], lr=1), 2),
        torch.optim.lr_scheduler._LRScheduler,
    )  # what detectron2 0.6's hook tests
    trainer, scheduler = _trainer_with_torch_scheduler()
    trainer.train(0, 5)
    assert scheduler.last_epoch == 5 and scheduler.get_last_lr() == [0.1 * 0.5**2]
    DetectionCheckpointer(trainer.model, str(tmp_path), trainer=trainer).save("model_0004")

    resumed, resumed_scheduler = _trainer_with_torch_scheduler()
    DetectionCheckpointer(resumed.model, str(tmp_path), trainer=resumed).resume_or_load(
        "", resume=True
    )
    assert resumed.iter == trainer.iter == 5
    assert resumed_scheduler.state_dict() == scheduler.state_dict()
    assert resumed.optimizer.param_groups[0]["lr"] == 0.1 * 0.5**2


@needs_shim
def test_torch_op_nms_rotated_says_the_extension_is_missing():
    from detectron2.layers import nms_rotated

    boxes, scores = torch.tensor([[5.0, 5.0, 4.0, 4.0, 0.0]]), torch.tensor([0.9])
    with pytest.raises(
        compat.ExtensionUnavailableError, match=r"nms_rotated is unavailable.*C\+\+"
    ):
        torch.ops.detectron2.nms_rotated(boxes, scores, 0.5)
    with pytest.raises(compat.ExtensionUnavailableError, match="rotated boxes need it"):
        nms_rotated(boxes, scores, 0.5)


@needs_shim
def test_model_zoo_says_its_configs_are_not_packaged():
    from detectron2 import model_zoo

    with pytest.raises(compat.ModelZooConfigsUnavailableError, match="packages no model-zoo"):
        model_zoo.get_config("COCO-Detection/retinanet_R_50_FPN_1x.yaml")
    with pytest.raises(RuntimeError, match=r"retinanet_R_50_FPN_1x\.yaml.*san_det's configs"):
        model_zoo.get_config_file("COCO-Detection/retinanet_R_50_FPN_1x.yaml")


# ------------------------------------------------- import order, installs, full upstream
def _python(code: str, **env):
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        cwd="/",  # not the repository: san_det comes from the installation
    )
    assert run.returncode == 0, run.stderr
    return run.stdout


@pytest.mark.slow
@needs_shim
def test_detectron2_imported_before_san_det_is_patched():
    """A tutorial-style script: detectron2 first (san_det_compat.pth installs the hook)."""
    out = _python("""
        import sys
        from detectron2.data.datasets import register_coco_instances
        import detectron2.export, detectron2.utils.analysis
        from detectron2.engine import hooks
        print("san_det imported:", "san_det" in sys.modules)
        import san_det
        from san_det import compat
        print("applied:", compat.is_applied(), sys.modules["san_det.compat"] is compat)
        """)
    assert "san_det imported: False" in out  # only compat.py was loaded, nothing registered
    assert "applied: True True" in out


@pytest.mark.slow
def test_san_det_first_then_detectron2_still_works():
    out = _python("""
        import san_det
        from detectron2.data.datasets import register_coco_instances
        import detectron2.export
        print("ok")
        """)
    assert out.strip() == "ok"


def _fake_full_detectron2(folder):
    """The installed detectron2's files plus a ``_C`` module: what compat takes for a full build."""
    import detectron2

    package = folder / "detectron2"
    package.mkdir()
    real = os.path.dirname(detectron2.__file__)
    for name in os.listdir(real):
        if not name.startswith("_C"):
            (package / name).symlink_to(os.path.join(real, name))
    (package / "_C.py").write_text("def has_cuda():\n    return False\n")
    return folder


@pytest.mark.slow
def test_nothing_is_patched_under_a_full_detectron2(tmp_path):
    out = _python(
        """
        import sys
        import detectron2, detectron2._C
        compat = sys.modules["san_det.compat"]  # loaded by san_det_compat.pth's hook
        from PIL import Image
        import numpy as np, torch
        print("extension:", compat.HAS_DETECTRON2_EXTENSION, compat.is_applied())
        print("C is a file:", detectron2._C.__file__.endswith("_C.py"))
        print("patches:", sorted(compat._patches()), compat._standins())
        import PIL
        print("aliases:", hasattr(Image, "LINEAR"), hasattr(np, "int"))
        print("versions:", PIL.__version__, np.__version__)
        print("op:", hasattr(torch.ops.detectron2, "nms_rotated"))
        import pkg_resources  # upstream main's model_zoo still imports it
        print("pkg_resources:", pkg_resources.resource_filename("detectron2", "config"))
        """,
        PYTHONPATH=str(_fake_full_detectron2(tmp_path)),
    )
    assert "extension: True False" in out and "C is a file: True" in out
    assert "patches: ['detectron2'] {}" in out
    assert "op: False" in out
    assert f"pkg_resources: {tmp_path}/detectron2/config" in out
    pillow, numpy = out.split("versions: ")[1].split()[:2]
    if int(pillow.split(".")[0]) >= 10 and tuple(map(int, numpy.split(".")[:2])) >= (1, 24):
        assert "aliases: False False" in out  # both removed there, and not re-added


def _build(kind: str, out_dir) -> Path:
    """The wheel that ``setuptools.build_meta.build_<kind>`` makes from a copy of the project
    (a build writes into the source tree)."""
    src = out_dir / "src"
    shutil.copytree(
        REPO_ROOT,
        src,
        ignore=shutil.ignore_patterns(".*", "__pycache__", "*.egg-info", "build", "output*",
                                      "datasets", "tests", "benchmarks", "docs"),
    )  # fmt: skip
    code = f"from setuptools.build_meta import build_{kind}; print(build_{kind}({str(out_dir)!r}))"
    run = subprocess.run([sys.executable, "-c", code], cwd=src, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return out_dir / run.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("kind", ["wheel", "editable"])
def test_installs_carry_the_import_hook(tmp_path, kind):
    with zipfile.ZipFile(_build(kind, tmp_path)) as wheel:
        files = set(wheel.namelist())
        assert "san_det_compat.pth" in files
        assert wheel.read("san_det_compat.pth").decode() == "import _san_det_compat_hook\n"
    if kind == "wheel":
        assert {"_san_det_compat_hook.py", "san_det/compat.py"} <= files


@pytest.mark.slow
@needs_shim
def test_regular_install_patches_detectron2_imported_first(tmp_path):
    """The wheel unpacked as a site directory (its .pth processed), this checkout's not seen."""
    site_dir = tmp_path / "site"
    with zipfile.ZipFile(_build("wheel", tmp_path)) as wheel:
        wheel.extractall(site_dir)
    import detectron2

    others = os.path.dirname(os.path.dirname(detectron2.__file__))  # detectron2, torch, ...
    code = f"""
        import site, sys
        sys.path.append({others!r})
        site.addsitedir({str(site_dir)!r})  # runs san_det_compat.pth
        from detectron2.data.datasets import register_coco_instances
        import detectron2.export
        compat = sys.modules["san_det.compat"]
        print(compat.__file__, compat.is_applied(), "san_det" in sys.modules)
        """
    run = subprocess.run(
        [sys.executable, "-S", "-c", textwrap.dedent(code)], capture_output=True, text=True,
        cwd="/", env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == [str(site_dir / "san_det" / "compat.py"), "True", "False"]
