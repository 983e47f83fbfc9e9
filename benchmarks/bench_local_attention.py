"""Speed and peak memory of SASA local attention per backend, next to a 3x3 convolution.

Shapes (N, C, H, W): (2, 64, 56, 56) and (2, 256, 28, 28); k = 7, 8 heads, float32. Cases:

- ``op``: ``local_attention(q, k, v, rel, num_heads=8, kernel_size=7)``, gradients of q, k, v, rel.
- ``layer``: ``LocalSelfAttention2d(C, C, 7, 8)`` (1x1 q/k/v projections + the op), gradients of
  the input and every parameter.
- ``conv3x3``: ``nn.Conv2d(C, C, 3, padding=1, bias=False)``, the layer SASA replaces.

``op`` and ``layer`` run with every backend available here: ``reference`` (the ``F.unfold``
oracle), ``cpu`` (the kernel source compiled with g++) on the CPU, ``cuda`` (CuPy) on a GPU.
Times are medians of ``--repeats`` runs after a warm-up; forward runs under ``torch.no_grad``,
forward+backward computes every gradient. Peak memory is the extra memory over the inputs during
one forward+backward: on a GPU ``torch.cuda.max_memory_allocated``; on the CPU the process's peak
resident set (``VmHWM``, reset through ``/proc/self/clear_refs`` after the warm-up) minus the
resident set before the run, in a fresh subprocess per case, with glibc's mmap threshold fixed so
freed blocks go back to the system (the figures include allocator and page granularity).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_local_attention.py          # CPU, writes the JSON
    OMP_NUM_THREADS=1 python benchmarks/bench_local_attention.py --quick  # tiny smoke run
    python benchmarks/bench_local_attention.py --device cuda

Writes ``benchmarks/results/local_attention_<device>.json`` and prints a Markdown table.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import cpu_name, ratio_table, reset_peak_rss, status_mb  # noqa: E402

SHAPES = [(2, 64, 56, 56), (2, 256, 28, 28)]
QUICK_SHAPES = [(1, 16, 14, 14)]
KERNEL_SIZE = 7
HEADS = 8


def _build(case: str, shape, device: str):
    """Two closures for one case: forward only, forward+backward."""
    from san_det.layers.local_attention import LocalSelfAttention2d, local_attention

    n, c, h, w = shape
    gen = torch.Generator().manual_seed(0)

    def randn(*size):
        return torch.randn(*size, generator=gen).to(device)

    if case == "op":
        q, k, v = (randn(n, c, h, w).requires_grad_() for _ in range(3))
        rel = randn(c, KERNEL_SIZE, KERNEL_SIZE).requires_grad_()
        leaves = [q, k, v, rel]

        def run():
            return local_attention(q, k, v, rel, num_heads=HEADS, kernel_size=KERNEL_SIZE)

    else:
        x = randn(n, c, h, w).requires_grad_()
        if case == "layer":
            module = LocalSelfAttention2d(c, c, KERNEL_SIZE, HEADS)
        else:
            module = torch.nn.Conv2d(c, c, 3, padding=1, bias=False)
        module = module.to(device).train()
        leaves = [x, *module.parameters()]

        def run():
            return module(x)

    grad = randn(n, c, h, w)

    def forward():
        with torch.no_grad():
            return run()

    def forward_backward():
        torch.autograd.grad(run(), leaves, grad)

    return forward, forward_backward


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time_ms(fn, device: str, repeats: int):
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), min(times)


def measure(case: str, backend: str, shape, device: str, repeats: int) -> dict:
    """One case; on the CPU run it in a fresh process (the peak is the process's resident set)."""
    from san_det.layers.backend import use_backend

    with use_backend(None if case == "conv3x3" else backend):
        forward, forward_backward = _build(case, shape, device)
        forward_backward()  # warm-up: compiles / loads the kernels, fills caches
        forward()
        if device == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            forward_backward()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            if not reset_peak_rss():
                raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs)")
            base = status_mb("VmRSS")
            forward_backward()
            peak = status_mb("VmHWM") - base
        fwd, fwd_min = _time_ms(forward, device, repeats)
        fwd_bwd, fwd_bwd_min = _time_ms(forward_backward, device, repeats)
    return {
        "case": case,
        "backend": backend,
        "shape": list(shape),
        "forward_ms": round(fwd, 3),
        "forward_backward_ms": round(fwd_bwd, 3),
        "forward_min_ms": round(fwd_min, 3),
        "forward_backward_min_ms": round(fwd_bwd_min, 3),
        "peak_mb": round(peak, 2),
    }


def _run_child(case, backend, shape, repeats) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    spec = json.dumps({"case": case, "backend": backend, "shape": shape, "repeats": repeats})
    proc = subprocess.run(
        [sys.executable, __file__, "--child", spec], env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark case {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="one tiny shape, 2 repeats")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None, help="override N of every shape")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        spec = json.loads(args.child)
        result = measure(spec["case"], spec["backend"], spec["shape"], "cpu", spec["repeats"])
        print(json.dumps(result))
        return

    from san_det.layers.kernel_runtime import cpu_compiler_available

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device")
    shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.batch:
        shapes = [(args.batch, *shape[1:]) for shape in shapes]
    repeats = args.repeats or (2 if args.quick else (20 if args.device == "cuda" else 5))
    if args.device == "cuda":
        backends = ["reference", "cuda"]
    else:
        backends = ["reference"] + (["cpu"] if cpu_compiler_available() else [])
    results = []
    for shape in shapes:
        for case in ("op", "layer", "conv3x3"):
            for backend in backends if case != "conv3x3" else ["torch"]:
                if args.device == "cuda":
                    r = measure(case, backend, shape, "cuda", repeats)
                else:
                    r = _run_child(case, backend, list(shape), repeats)
                results.append(r)
                print(json.dumps(r), file=sys.stderr, flush=True)

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else cpu_name()
    report = {
        "device": args.device,
        "device_name": device_name,
        "torch": torch.__version__,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "torch_threads": torch.get_num_threads(),
        "kernel_size": KERNEL_SIZE,
        "num_heads": HEADS,
        "dtype": "float32",
        "repeats": repeats,
        "quick": args.quick,
        "memory_method": "cuda max_memory_allocated"
        if args.device == "cuda"
        else "VmHWM after clear_refs minus VmRSS, fresh process per case",
        "results": results,
    }
    if args.quick:
        name = f"local_attention_{args.device}_quick.json"
    else:
        name = f"local_attention_{args.device}{f'_n{args.batch}' if args.batch else ''}.json"
    out = args.out or ROOT / "benchmarks" / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"device {report['device_name']}, torch {torch.__version__}, "
        f"OMP_NUM_THREADS={report['OMP_NUM_THREADS']} (torch threads {report['torch_threads']}), "
        f"float32, k={KERNEL_SIZE}, {HEADS} heads, median of {repeats}; wrote {out}\n"
    )
    print(ratio_table(results, "case"))


if __name__ == "__main__":
    main()
