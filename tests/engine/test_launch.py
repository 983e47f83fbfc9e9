"""Multi-process data-parallel training on the CPU (gloo), through san_det.engine.launch.

Two processes with batch b each must train exactly as one process with batch 2b: same data
(the resumable stream deals the same samples), gradients averaged by DDP, a norm that does not
depend on the per-process batch (GroupNorm), or SyncBN (CPUSyncBatchNorm) against plain BN on the
whole batch.
"""

import os
import shutil
import subprocess
import sys

import pytest
import torch
from detectron2.engine import HookBase
from detectron2.utils import comm

import san_det  # noqa: F401
from san_det.detection import DetectionTrainer
from san_det.engine import NonFiniteError, launch, wrap_ddp
from san_det.engine.ddp import CPUSyncBatchNorm
from tests.helpers.coco_files import register_coco_dataset, simple_images
from tests.helpers.paths import REPO_ROOT
from tests.helpers.scripts import child_env
from tests.helpers.tiny_detection import tiny_retinanet_cfg, tiny_test_net_cfg

NORMS = ("GN", "SyncBN", "BN")
ITERS = 3


def _train(folder, out_root, norm, total_batch):
    register_coco_dataset("launch_train", folder)
    cfg = tiny_test_net_cfg(os.path.join(out_root, norm), ("launch_train",), ITERS, norm=norm)
    cfg.SOLVER.IMS_PER_BATCH = total_batch
    trainer = DetectionTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    model = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, model


def _worker(folder, out_root, total_batch, result_path):
    """Runs in every process: trains one model per norm, rank 0 saves the weights."""
    results, kinds = {}, {}
    for norm in NORMS:
        results[norm], model = _train(folder, out_root, norm, total_batch)
        kinds[norm] = type(model.norm).__name__
    # What the other rank ended with: data-parallel replicas must agree.
    gathered = comm.all_gather(results["GN"]["fc.weight"])
    nan_error = _nan_on_rank_1(folder, out_root, total_batch)
    retinanet = _retinanet_straight_and_resumed(folder, out_root, total_batch)
    if comm.is_main_process():
        torch.save(
            {
                "weights": results,
                "norm_types": kinds,
                "world": comm.get_world_size(),
                "replicas": gathered,
                "nan_error": nan_error,
                "retinanet": retinanet,
            },
            result_path,
        )


def _retinanet_straight_and_resumed(folder, out_root, total_batch):
    """A tiny RetinaNet trained 4 iterations, and resumed from its checkpoint of iteration 1:
    (straight weights, resumed weights, per-rank loss normalisers in that checkpoint)."""
    register_coco_dataset("launch_train", folder)
    checkpoint = os.path.join(out_root, "retinanet_straight", "model_0000001.pth")
    weights = []
    for name in ("straight", "resumed"):
        cfg = tiny_retinanet_cfg(os.path.join(out_root, f"retinanet_{name}"), ("launch_train",), 4)
        cfg.SOLVER.IMS_PER_BATCH = total_batch
        cfg.SOLVER.CHECKPOINT_PERIOD = 2
        resume = name == "resumed"
        if resume and comm.is_main_process():
            os.makedirs(cfg.OUTPUT_DIR)
            shutil.copy(checkpoint, cfg.OUTPUT_DIR)
            with open(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"), "w") as f:
                f.write("model_0000001.pth")
        comm.synchronize()
        trainer = DetectionTrainer(cfg)
        trainer.resume_or_load(resume=resume)
        trainer.train()
        state = trainer.model.module.state_dict()
        weights.append({k: v.detach().clone() for k, v in state.items()})
    normalizers = torch.load(checkpoint)["model_running_state"]["<per rank>"]
    return weights[0], weights[1], normalizers


class _PoisonRank1(HookBase):
    def before_step(self):
        if self.trainer.iter == 1 and comm.get_rank() == 1:
            with torch.no_grad():
                self.trainer.model.module.fc.bias.fill_(float("nan"))


def _nan_on_rank_1(folder, out_root, total_batch):
    """Only rank 1's loss becomes NaN: every rank must stop at that iteration (no hang)."""
    register_coco_dataset("launch_train", folder)
    cfg = tiny_test_net_cfg(os.path.join(out_root, "nan"), ("launch_train",), ITERS, norm="GN")
    cfg.SOLVER.IMS_PER_BATCH = total_batch
    trainer = DetectionTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.register_hooks([_PoisonRank1()])
    try:
        trainer.train()
    except NonFiniteError as e:
        return str(e)
    return None


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("launch")
    folder = str(root / "data")
    register_coco_dataset("launch_train", folder, simple_images(12, seed=3))
    launch(
        _worker,
        2,
        dist_url="auto",
        args=(folder, str(root / "two"), 4, str(root / "two.pt")),
        device="cpu",
    )
    two = torch.load(root / "two.pt")
    one = {norm: _train(folder, str(root / "one"), norm, 4)[0] for norm in ("GN", "BN")}
    one_small = _train(folder, str(root / "small"), "GN", 2)[0]
    init = _init_weights(folder, str(root / "init"))
    return two, one, one_small, init


def _init_weights(folder, out):
    cfg = tiny_test_net_cfg(out, ("launch_train",), 1, norm="GN")
    trainer = DetectionTrainer(cfg)
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def _assert_close(a, b, keys=None, atol=1e-6, rtol=1e-5):
    keys = keys or [k for k in a if a[k].is_floating_point()]
    for k in keys:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=rtol, msg=lambda m: f"{k}: {m}")


@pytest.mark.slow
def test_two_processes_equal_one_process_with_twice_the_batch(runs):
    two, one, one_small, init = runs
    assert two["world"] == 2
    # The replicas agree with each other and the model really trained.
    torch.testing.assert_close(two["replicas"][0], two["replicas"][1], atol=0, rtol=0)
    assert (two["weights"]["GN"]["conv.weight"] - init["conv.weight"]).abs().max() > 1e-3
    _assert_close(two["weights"]["GN"], one["GN"])
    # Sensitivity: one process with batch b (other data per step) ends elsewhere.
    diff = (one_small["conv.weight"] - one["GN"]["conv.weight"]).abs().max()
    assert diff > 1e-4, diff


@pytest.mark.slow
def test_syncbn_across_processes_equals_bn_on_the_whole_batch(runs):
    two, one, _, _ = runs
    assert two["norm_types"]["SyncBN"] == "CPUSyncBatchNorm"
    sync, full = two["weights"]["SyncBN"], one["BN"]
    _assert_close(sync, full, keys=["conv.weight", "norm.weight", "norm.bias", "fc.weight"])
    # float32 sums over two halves vs the whole batch (16384 values per channel): ~1e-6 apart.
    for k in ("norm.running_mean", "norm.running_var", "norm.num_batches_tracked"):
        torch.testing.assert_close(sync[k], full[k], atol=1e-5, rtol=1e-4)
    # Plain BN with two processes normalises each half alone: its statistics differ.
    local = two["weights"]["BN"]
    assert (local["norm.running_var"] - full["norm.running_var"]).abs().max() > 1e-4


@pytest.mark.slow
def test_nan_on_one_process_stops_every_process(runs):
    two = runs[0]
    message = two["nan_error"]  # rank 0's: its own loss was finite
    assert message is not None
    assert "non-finite loss at iteration 1 on at least one process" in message


@pytest.mark.slow
def test_two_process_retinanet_resumes_exactly(runs):
    """Each rank resumes with its own RetinaNet loss normaliser (an EMA of its own images'
    foreground anchors), so the resumed run ends with the uninterrupted run's weights."""
    straight, resumed, normalizers = runs[0]["retinanet"]
    assert len(normalizers) == 2 and normalizers[0] != normalizers[1]
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k


def test_wrap_ddp_is_identity_in_one_process():
    model = torch.nn.Linear(2, 2)
    assert wrap_ddp(model) is model


def test_cpu_syncbn_single_process_matches_batchnorm():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 2, dtype=torch.float64, requires_grad=True)
    bn = torch.nn.BatchNorm2d(3).double()
    sync = CPUSyncBatchNorm(3).double()
    for m in (bn, sync):
        m.weight.data.uniform_(0.5, 1.5)
    sync.load_state_dict(bn.state_dict())
    y1 = bn(x)
    g1 = torch.autograd.grad(y1.square().sum(), x)[0]
    y2 = sync(x)
    g2 = torch.autograd.grad(y2.square().sum(), x)[0]
    torch.testing.assert_close(y1, y2)
    torch.testing.assert_close(g1, g2)
    torch.testing.assert_close(bn.running_var, sync.running_var)


def test_launch_rejects_bad_arguments():
    with pytest.raises(ValueError, match="at least one process"):
        launch(print, 0)
    with pytest.raises(ValueError, match="'cuda' or 'cpu'"):
        launch(print, 2, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            launch(print, 2, device="cuda")


_DRIVER = """
import sys
sys.path.insert(0, {root!r})
import san_det
from tests.helpers.coco_files import register_coco_dataset
register_coco_dataset("launch_cli_train", {folder!r})
import train_net
if __name__ == "__main__":
    train_net.cli(sys.argv[1:])
"""


@pytest.mark.slow
def test_train_net_runs_two_cpu_processes(tmp_path):
    """train_net.py --num-processes 2: RetinaNet trains in two gloo processes to the end."""
    folder = tmp_path / "data"
    register_coco_dataset("launch_cli_train", str(folder), simple_images(8))
    cfg = tiny_retinanet_cfg(str(tmp_path / "out"), ("launch_cli_train",), max_iter=3)
    cfg.SOLVER.IMS_PER_BATCH = 4
    (tmp_path / "tiny.yaml").write_text(cfg.dump())
    (tmp_path / "driver.py").write_text(_DRIVER.format(root=str(REPO_ROOT), folder=str(folder)))
    proc = subprocess.run(
        [
            sys.executable,
            str(tmp_path / "driver.py"),
            "--config-file",
            str(tmp_path / "tiny.yaml"),
            "--num-processes",
            "2",
            "--dist-url",
            "auto",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=child_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (tmp_path / "out" / "log.txt").read_text()
    assert "World size: 2" in log
    assert (tmp_path / "out" / "model_final.pth").is_file()
