"""Speed and peak memory of SAN's aggregation and of a pairwise SAM layer, per backend.

For each shape (N=2, C=64, 56x56) and (N=2, C=256, 28x28), k=7, Cw=C/8, reflection padding:

- ``aggregation``: x (N, C, H, W), w (N, C/8, 49, H*W) -> (N, C, H, W).
- ``sam_pairwise``: ``SAM(0, C, C/16, C, 8, 7)`` in training mode (subtraction relation).
- ``conv3x3``: ``nn.Conv2d(C, C, 3, padding=1, bias=False)`` on x, the baseline.

Each is timed forward (under ``torch.no_grad``) and forward+backward (gradients of every input and
parameter), median of ``--repeats`` runs after one warm-up, for every backend that can run here:
``reference`` (the ``F.unfold`` oracle), ``cpu`` (the compiled kernel source) on the CPU,
``cuda`` (CuPy kernels) on a GPU. Peak memory is the extra memory over the inputs during a
forward+backward: on a GPU ``torch.cuda.max_memory_allocated``; on the CPU the rise of the process's
peak resident set (``ru_maxrss``) in a fresh subprocess per case, with glibc's mmap threshold fixed
so freed blocks go back to the system (so CPU figures include allocator and page granularity).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_san_ops.py            # CPU, writes results JSON
    OMP_NUM_THREADS=1 python benchmarks/bench_san_ops.py --quick    # first shape, fewer repeats
    python benchmarks/bench_san_ops.py --device cuda [--batch 32]

Results go to ``benchmarks/results/san_ops_<device>.json`` and a Markdown table to stdout.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import ratio_table  # noqa: E402

SHAPES = [(2, 64, 56, 56), (2, 256, 28, 28)]
KERNEL_SIZE = 7
SHARE = 8  # Cw = C / SHARE attention-weight channels
OPS = ("aggregation", "sam_pairwise", "conv3x3")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _build(op: str, shape, device: str, dtype=torch.float32):
    """Inputs and two closures: forward only, forward+backward."""
    from san_det.layers.san_attention import SAM
    from san_det.layers.ops import aggregation

    n, c, h, w = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, w, generator=gen, dtype=dtype).to(device).requires_grad_()
    pad = KERNEL_SIZE // 2
    if op == "aggregation":
        wt = torch.randn(n, c // SHARE, KERNEL_SIZE**2, h * w, generator=gen, dtype=dtype)
        wt = wt.softmax(dim=2).to(device).requires_grad_()

        def run():
            return aggregation(x, wt, KERNEL_SIZE, 1, pad, 1, "reflect")

        leaves = [x, wt]
    else:
        if op == "sam_pairwise":
            module = SAM(0, c, c // 16, c, SHARE, KERNEL_SIZE)
        else:
            module = torch.nn.Conv2d(c, c, 3, padding=1, bias=False)
        module = module.to(device=device, dtype=dtype).train()

        def run():
            return module(x)

        leaves = [x, *module.parameters()]
    grad = torch.randn(n, c, h, w, generator=gen, dtype=dtype).to(device)

    def forward():
        with torch.no_grad():
            return run()

    def forward_backward():
        out = run()
        torch.autograd.grad(out, leaves, grad)

    return forward, forward_backward


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time_ms(fn, device: str, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure(op: str, backend: str, shape, device: str, repeats: int) -> dict:
    """One case: forward/forward+backward median ms and peak extra MB (run it in a fresh process
    on the CPU, since the peak is read from the process's resident set)."""
    from san_det.layers.backend import use_backend

    with use_backend(None if op == "conv3x3" else backend):
        # Warm up on a small shape first: loads the compiled kernels without touching the peak.
        small = (1, shape[1], 12, 12)
        for fn in _build(op, small, device):
            fn()
        forward, forward_backward = _build(op, shape, device)
        if device == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            forward_backward()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            base = _rss_mb()
            forward_backward()
            peak = _maxrss_mb() - base
        fwd = _time_ms(forward, device, repeats)
        fwd_bwd = _time_ms(forward_backward, device, repeats)
    return {
        "op": op,
        "backend": backend,
        "shape": list(shape),
        "forward_ms": round(fwd, 3),
        "forward_backward_ms": round(fwd_bwd, 3),
        "peak_mb": round(peak, 2),
    }


def _run_child(op, backend, shape, repeats) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    spec = json.dumps({"op": op, "backend": backend, "shape": shape, "repeats": repeats})
    proc = subprocess.run(
        [sys.executable, __file__, "--child", spec], env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark case {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="first shape only, 2 repeats")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None, help="override N of every shape")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        spec = json.loads(args.child)
        result = measure(spec["op"], spec["backend"], spec["shape"], "cpu", spec["repeats"])
        print(json.dumps(result))
        return

    from san_det.layers.kernel_runtime import cpu_compiler_available

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device")
    shapes = SHAPES[:1] if args.quick else SHAPES
    if args.batch:
        shapes = [(args.batch, *shape[1:]) for shape in shapes]
    repeats = args.repeats or (2 if args.quick else (20 if args.device == "cuda" else 5))
    if args.device == "cuda":
        backends = ["reference", "cuda"]
    else:
        backends = ["reference"] + (["cpu"] if cpu_compiler_available() else [])
    load_before = os.getloadavg()
    results = []
    for shape in shapes:
        for op in OPS:
            for backend in backends if op != "conv3x3" else ["torch"]:
                if args.device == "cuda":
                    r = measure(op, backend, shape, "cuda", repeats)
                else:
                    r = _run_child(op, backend, list(shape), repeats)
                results.append(r)
                print(json.dumps(r), file=sys.stderr, flush=True)

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor()
    report = {
        "device": args.device,
        "device_name": device_name or platform.machine(),
        "torch": torch.__version__,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "torch_threads": torch.get_num_threads(),
        "kernel_size": KERNEL_SIZE,
        "weight_channels": f"C/{SHARE}",
        "repeats": repeats,
        # Other processes share this machine's CPUs: the 1-minute load before and after.
        "load_average_1min": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "cpu_count": os.cpu_count(),
        "quick": args.quick,
        "results": results,
    }
    suffix = f"_n{args.batch}" if args.batch else ""
    out = args.out or ROOT / "benchmarks" / "results" / f"san_ops_{args.device}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"device {report['device_name']}, torch {torch.__version__}, "
        f"OMP_NUM_THREADS={report['OMP_NUM_THREADS']}, repeats {repeats}, load "
        f"{report['load_average_1min']} on {os.cpu_count()} CPUs; wrote {out}\n"
    )
    print(ratio_table(results, "op"))


if __name__ == "__main__":
    main()
