"""``make gpu-check``: everything that needs a CUDA GPU, in one run of at most 8 minutes.

1. the CUDA tests, ``pytest -m cuda`` (the kernels, CuPy plumbing, compile, AMP, determinism);
2. side by side, in float32 and under AMP (``torch.autocast`` float16), forward and
   forward+backward time (median, CUDA-synchronised) and peak extra memory
   (``torch.cuda.max_memory_allocated``):

   - ``op``: SASA's ``local_attention`` (k 7, 8 heads) on the ``cuda`` kernels and the
     ``reference`` backend (with the largest difference between them), cuDNN's 3x3 convolution
     of the same tensor, and FlexAttention compiled with ``torch.compile`` (2-D window block mask,
     ``q . r`` added by a score_mod from a precomputed table: ``flex_sasa.py``);
   - ``layer``: ``LocalSelfAttention2d`` against the 3x3 convolution it replaces;
   - ``stem``: ``SpatiallyAwareAttentionStem`` against ResNet's conv stem;
   - ``retinanet``: train step (forward, backward, SGD; a GradScaler under AMP) and inference of
     R50, SASA-50 and SASA-50 with the attentional FPN and head.

Each part runs only while the time budget (``--budget-s``, 480 s) lasts; a part left out is
recorded as such. The JSON goes to ``benchmarks/results/gpu_check_<gpu>.json``; the exit status
is non-zero when a test failed or a part raised. On a machine without a CUDA GPU it says so in one
line and exits with status 1, having run nothing. ``--device cpu --smoke`` runs the same code on
tiny CPU shapes (no tests, no compile, forward only for FlexAttention, whose CPU path has no
backward), for the test suite; it is not a GPU check.

Usage::

    make gpu-check                       # = python benchmarks/gpu_check.py
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import cuda_peak_mb, times_ms  # noqa: E402
from flex_sasa import flex_local_attention, sasa_block_mask  # noqa: E402

NO_GPU = "gpu-check: no CUDA GPU on this machine (torch.cuda.is_available() is False); nothing run"
MODES = ("float32", "amp")
# (N, C, H, W): SASA-50's res2 and res3 at batch 8; k 7, 8 heads.
OP_SHAPES = [(8, 64, 56, 56), (8, 256, 28, 28)]
RETINANETS = ("retinanet_R_50_FPN_1x", "retinanet_sasa50", "retinanet_sasa50_attention_fpn_head")


class Bench:
    """Device, mode and timing of one run."""

    def __init__(self, device: str, smoke: bool, repeats: int):
        self.device, self.smoke, self.repeats = device, smoke, repeats
        self.cuda = device == "cuda"

    def autocast(self, mode: str):
        dtype = torch.float16 if self.cuda else torch.bfloat16
        return torch.autocast(self.device, dtype=dtype, enabled=mode == "amp")

    def measure(self, forward, mode: str, backward: bool = True) -> dict:
        """Times of ``forward()`` and of its output's backward, and the peak extra memory."""
        sync = torch.cuda.synchronize if self.cuda else None

        def fwd():
            with torch.no_grad(), self.autocast(mode):
                forward()

        def fwd_bwd():
            with self.autocast(mode):
                out = forward()
            out.float().sum().backward()

        step = fwd_bwd if backward else fwd
        step()  # warm-up: compiles kernels and graphs
        result = {"forward_ms": round(times_ms(fwd, self.repeats, sync)[0], 3)}
        if backward:
            result["forward_backward_ms"] = round(times_ms(fwd_bwd, self.repeats, sync)[0], 3)
        if self.cuda:
            result["peak_mb"] = round(cuda_peak_mb(step), 1)
        return result


def _tensors(shape, device, seed, count):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return [torch.randn(shape, generator=g).to(device).requires_grad_() for _ in range(count)]


def op_part(bench: Bench, mode: str) -> dict:
    from san_det.layers.ops import local_attention

    kernel_backend = "cuda" if bench.cuda else "cpu"
    compiled = flex_attention_fn(bench)
    rows = {}
    for shape in OP_SHAPES if not bench.smoke else [(1, 16, 9, 11)]:
        n, c, h, w = shape
        q, k, v = _tensors(shape, bench.device, 0, 3)
        rel = _tensors((c, 7, 7), bench.device, 1, 1)[0]
        conv = nn.Conv2d(c, c, 3, padding=1, bias=False).to(bench.device)
        mask = sasa_block_mask(h, w, 7, 1, bench.device)

        def sasa(backend):
            return lambda: local_attention(q, k, v, rel, num_heads=8, kernel_size=7,
                                           backend=backend)  # fmt: skip

        def flex():
            args = (q, k, v, rel)
            if mode == "amp":  # FlexAttention takes the AMP dtype as its inputs' dtype
                args = tuple(t.to(torch.float16 if bench.cuda else torch.bfloat16) for t in args)
            if not bench.cuda:  # no backward on the CPU, and it refuses inputs that need one
                args = tuple(t.detach() for t in args)
            return flex_local_attention(*args, num_heads=8, kernel_size=7, attention=compiled,
                                        block_mask=mask)  # fmt: skip

        key = "N{}C{}H{}W{}".format(*shape)
        rows[key] = {
            "conv3x3 (cuDNN)" if bench.cuda else "conv3x3": bench.measure(lambda: conv(q), mode),
            f"sasa op ({kernel_backend})": bench.measure(sasa(kernel_backend), mode),
            "sasa op (reference)": bench.measure(sasa("reference"), mode),
            "flex attention": bench.measure(flex, mode, backward=bench.cuda),
            "max_abs_difference_kernels_vs_reference": _difference(
                sasa(kernel_backend), sasa("reference"), (q, k, v, rel), bench, mode
            ),
        }
    return rows


def flex_attention_fn(bench: Bench):
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention) if bench.cuda else flex_attention


def _difference(fast, reference, inputs, bench: Bench, mode: str) -> dict:
    """Largest difference of the output and of every input gradient, fast vs reference."""
    results = []
    for fn in (fast, reference):
        with bench.autocast(mode):
            out = fn()
        grads = torch.autograd.grad(out.float().square().sum(), inputs)
        results.append((out.detach().float(), *(g.float() for g in grads)))
    names = ("out", "grad_q", "grad_k", "grad_v", "grad_rel")
    return {n: float((a - b).abs().max()) for n, a, b in zip(names, *results)}


def layer_part(bench: Bench, mode: str) -> dict:
    from san_det.layers import LocalSelfAttention2d

    rows = {}
    for shape in OP_SHAPES if not bench.smoke else [(1, 16, 9, 11)]:
        n, c, h, w = shape
        (x,) = _tensors(shape, bench.device, 2, 1)
        layer = LocalSelfAttention2d(c, c, kernel_size=7, num_heads=8).to(bench.device)
        conv = nn.Conv2d(c, c, 3, padding=1, bias=False).to(bench.device)
        rows["N{}C{}H{}W{}".format(*shape)] = {
            "conv3x3": bench.measure(lambda: conv(x), mode),
            "LocalSelfAttention2d": bench.measure(lambda: layer(x), mode),
        }
    return rows


def stem_part(bench: Bench, mode: str) -> dict:
    from san_det.layers import SpatiallyAwareAttentionStem

    batch, size = (1, 32) if bench.smoke else (8, 224)
    (x,) = _tensors((batch, 3, size, size), bench.device, 3, 1)
    conv = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64),
                         nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))  # fmt: skip
    stem = SpatiallyAwareAttentionStem(3, 64, block_size=4, num_heads=8)
    conv, stem = (m.to(bench.device).train() for m in (conv, stem))
    return {
        f"N{batch} 3x{size}x{size}": {
            "conv stem": bench.measure(lambda: conv(x), mode),
            "attention stem": bench.measure(lambda: stem(x), mode),
        }
    }


def retinanet_part(bench: Bench, mode: str) -> dict:
    import san_det  # noqa: F401  # isort: skip  (patches detectron2 0.6 before it is imported)
    from bench_retinanet import _config_path, _inputs
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from san_det.config import get_san_det_cfg

    batch, size = (1, 64) if bench.smoke else (2, 512)
    models = RETINANETS[:1] if bench.smoke else RETINANETS
    sync = torch.cuda.synchronize if bench.cuda else None
    rows = {}
    for name in models:
        torch.manual_seed(0)
        cfg = get_san_det_cfg()
        cfg.merge_from_file(str(_config_path(name)))
        cfg.MODEL.DEVICE = bench.device
        model = build_model(cfg)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
        scaler = torch.amp.GradScaler(bench.device, enabled=mode == "amp" and bench.cuda)
        inputs = _inputs(batch, size, cfg.MODEL.RETINANET.NUM_CLASSES)

        def train_step():
            with EventStorage(0), bench.autocast(mode):
                loss = sum(model(inputs).values())
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

        def inference():
            with torch.no_grad(), bench.autocast(mode):
                model([{k: x[k] for k in ("image", "height", "width")} for x in inputs])

        model.train()
        train_step()
        row = {"train_step_ms": round(times_ms(train_step, bench.repeats, sync)[0], 2)}
        if bench.cuda:
            row["train_peak_mb"] = round(cuda_peak_mb(train_step), 1)
        model.eval()
        inference()
        row["inference_ms"] = round(times_ms(inference, bench.repeats, sync)[0], 2)
        rows[name] = row
        del model, optimizer
    return {f"N{batch} {size}x{size}": rows}


PARTS = {"op": op_part, "layer": layer_part, "stem": stem_part, "retinanet": retinanet_part}


def run_cuda_tests(timeout_s: float) -> dict:
    """``pytest -m cuda`` in a child process: its exit status and summary line."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests"]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"returncode": None, "summary": f"timed out after {timeout_s:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if re.search(r"passed|failed|error", ln)]
    failures = [ln for ln in proc.stdout.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    return {
        "returncode": proc.returncode,
        "summary": lines[-1] if lines else proc.stdout[-500:],
        "failures": failures,
        "seconds": round(time.perf_counter() - start, 1),
    }


def _header(device: str) -> dict:
    try:
        import cupy

        cupy_version = cupy.__version__
    except Exception:  # noqa: BLE001  (not installed or broken: recorded, not fatal)
        cupy_version = None
    return {
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cupy": cupy_version,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (with --device cpu)")
    parser.add_argument("--budget-s", type=float, default=480.0)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(NO_GPU)
        return 1
    if args.device == "cpu" and not (args.smoke and args.out):
        parser.error("--device cpu is the smoke run: give --smoke and --out")
    deadline = time.monotonic() + args.budget_s
    report = _header(args.device)
    failed = False
    if args.device == "cuda" and not args.skip_tests:
        report["cuda_tests"] = run_cuda_tests(min(240.0, args.budget_s / 2))
        failed = report["cuda_tests"]["returncode"] != 0
    bench = Bench(args.device, args.smoke, 1 if args.smoke else args.repeats)
    for part in args.parts:
        for mode in MODES:
            key = f"{part} {mode}"
            if time.monotonic() > deadline:
                report[key] = "not run: the time budget was spent"
                continue
            start = time.perf_counter()
            try:
                report[key] = PARTS[part](bench, mode)
            except Exception as error:  # noqa: BLE001  (recorded; the other parts still run)
                report[key] = f"error: {type(error).__name__}: {error}"
                failed = True
            print(f"{key}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
            if bench.cuda:
                torch.cuda.empty_cache()
    slug = re.sub(r"[^a-z0-9]+", "_", report["device_name"].lower()).strip("_")
    out = args.out or ROOT / "benchmarks" / "results" / f"gpu_check_{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print(f"gpu-check: wrote {out}; {'FAILED' if failed else 'ok'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
