"""Speed and peak memory of SAN's aggregation and subtraction2 and of a pairwise SAM layer, per
backend, side by side in one run.

For each shape (N=2, C=64, 56x56) and (N=2, C=256, 28x28), k=7, Cw=C/8, reflection padding:

- ``aggregation``: x (N, C, H, W), w (N, C/8, 49, H*W) -> (N, C, H, W).
- ``subtraction2``: x1, x2 (N, C, H, W) -> (N, C, 49, H*W) (SAM's relation, before its MLP).
- ``sam_pairwise``: ``SAM(0, C, C/16, C, 8, 7)`` in training mode (subtraction relation).
- ``conv3x3``: ``nn.Conv2d(C, C, 3, padding=1, bias=False)`` on x, the baseline.

Each is timed forward (under ``torch.no_grad``) and forward+backward (gradients of every input and
parameter), median of ``--repeats`` runs after one warm-up, as wall time and process CPU time, for
every backend that can run here: ``reference`` (the ``F.unfold`` oracle), ``cpu`` (the compiled
kernel source) on the CPU, ``cuda`` (CuPy kernels) on a GPU. Peak memory is the extra memory over
the inputs during a forward+backward: on a GPU ``torch.cuda.max_memory_allocated``; on the CPU the
rise of the process's peak resident set (``ru_maxrss``) in a fresh subprocess per case, with
glibc's mmap threshold fixed so freed blocks go back to the system (so CPU figures include
allocator and page granularity); times come from another fresh subprocess with the default
allocator. The 1-minute load average is recorded next to every case.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_san_ops.py            # CPU, writes results JSON
    OMP_NUM_THREADS=1 python benchmarks/bench_san_ops.py --quick    # first shape, fewer repeats
    python benchmarks/bench_san_ops.py --device cuda [--batch 32]

Results go to ``benchmarks/results/san_ops_<device>.json`` and a Markdown table to stdout.
"""

import functools
import os
import resource
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import _common as common  # noqa: E402

SHAPES = [(2, 64, 56, 56), (2, 256, 28, 28)]
KERNEL_SIZE = 7
SHARE = 8  # Cw = C / SHARE attention-weight channels
OPS = ("aggregation", "subtraction2", "sam_pairwise", "conv3x3")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _build(op: str, shape, device: str, dtype=torch.float32):
    """Inputs and two closures: forward only, forward+backward."""
    from san_det.layers.ops import aggregation, subtraction2
    from san_det.layers.san_attention import SAM

    n, c, h, w = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, w, generator=gen, dtype=dtype).to(device).requires_grad_()
    pad = KERNEL_SIZE // 2
    out_shape = (n, c, h, w)
    if op == "aggregation":
        wt = torch.randn(n, c // SHARE, KERNEL_SIZE**2, h * w, generator=gen, dtype=dtype)
        wt = wt.softmax(dim=2).to(device).requires_grad_()

        def run():
            return aggregation(x, wt, KERNEL_SIZE, 1, pad, 1, "reflect")

        leaves = [x, wt]
    elif op == "subtraction2":
        x2 = torch.randn(n, c, h, w, generator=gen, dtype=dtype).to(device).requires_grad_()

        def run():
            return subtraction2(x, x2, KERNEL_SIZE, 1, pad, 1, "reflect")

        leaves = [x, x2]
        out_shape = (n, c, KERNEL_SIZE**2, h * w)
    else:
        if op == "sam_pairwise":
            module = SAM(0, c, c // 16, c, SHARE, KERNEL_SIZE)
        else:
            module = torch.nn.Conv2d(c, c, 3, padding=1, bias=False)
        module = module.to(device=device, dtype=dtype).train()

        def run():
            return module(x)

        leaves = [x, *module.parameters()]
    grad = torch.randn(out_shape, generator=gen, dtype=dtype).to(device)

    def forward():
        with torch.no_grad():
            return run()

    def forward_backward():
        out = run()
        torch.autograd.grad(out, leaves, grad)

    return forward, forward_backward


def measure(op: str, backend: str, shape, device: str, repeats: int, what: str) -> dict:
    """One case: ``what`` is "time" (medians) or "memory" (peak extra MB of one
    forward+backward; on the CPU run it in a fresh process: it reads the resident set)."""
    from san_det.layers.backend import use_backend

    with use_backend(None if op == "conv3x3" else backend):
        # Warm up on a small shape first: loads the compiled kernels without touching the peak.
        small = (1, shape[1], 12, 12)
        for fn in _build(op, small, device):
            fn()
        forward, forward_backward = _build(op, shape, device)
        if what == "memory":
            if device == "cuda":
                peak = common.cuda_peak_mb(forward_backward)
            else:
                base = _rss_mb()
                forward_backward()
                peak = _maxrss_mb() - base
            return {"peak_mb": round(peak, 2)}
        forward_backward()
        times = common.forward_backward_times(forward, forward_backward, repeats, device)
    return {"op": op, "backend": backend, "shape": list(shape), **times}


def main() -> None:
    args = common.op_benchmark_args(__doc__.split("\n")[0], "first shape only, 2 repeats")
    if common.answer_child(args, measure, "op"):
        return
    shapes, repeats, backends = common.cases_to_run(args, SHAPES, SHAPES[:1])
    load_before = os.getloadavg()
    results = []
    for shape in shapes:
        for op in OPS:
            for backend in backends if op != "conv3x3" else ["torch"]:
                spec = {"op": op, "backend": backend, "shape": list(shape), "repeats": repeats}
                on_gpu = functools.partial(measure, op, backend, shape, "cuda", repeats)
                results.append(common.time_and_memory(__file__, spec, args.device, on_gpu))

    report = common.report_header(args, repeats, load_before)
    report.update(
        kernel_size=KERNEL_SIZE,
        weight_channels=f"C/{SHARE}",
        cpu_count=os.cpu_count(),
        results=results,
    )
    suffix = f"_n{args.batch}" if args.batch else ""
    out = args.out or ROOT / "benchmarks" / "results" / f"san_ops_{args.device}{suffix}.json"
    common.write_report(report, out)
    print(
        f"device {report['device_name']} ({report['cpu_isa']}), torch {torch.__version__}, "
        f"OMP_NUM_THREADS={report['OMP_NUM_THREADS']}, repeats {repeats}, load "
        f"{report['load_average_1min']} on {os.cpu_count()} CPUs; wrote {out}\n"
    )
    print(common.ratio_table(results, "op"))


if __name__ == "__main__":
    main()
