"""Speed and peak memory of SASA local attention per backend, next to a 3x3 convolution and the
core's matrix-multiply rate, side by side in one run.

Shapes (N, C, H, W): (2, 64, 56, 56) and (2, 256, 28, 28); k = 7, 8 heads, float32. Cases:

- ``op``: ``local_attention(q, k, v, rel, num_heads=8, kernel_size=7)``, gradients of q, k, v, rel.
- ``layer``: ``LocalSelfAttention2d(C, C, 7, 8)`` (1x1 q/k/v projections + the op), gradients of
  the input and every parameter.
- ``conv3x3``: ``nn.Conv2d(C, C, 3, padding=1, bias=False)``, the layer SASA replaces.
- ``mm``: one ``torch.mm`` of two 2048 x 2048 matrices, the reference rate of this core (FLOP/s of
  the other cases are given as a share of it).

``op`` and ``layer`` run with every backend available here: ``reference`` (the ``F.unfold``
oracle), ``cpu`` (the kernel source compiled with g++) on the CPU, ``cuda`` (CuPy) on a GPU.
Times are medians of ``--repeats`` runs after a warm-up, as wall time and, on the CPU, as the
process's CPU time (less sensitive to other jobs taking the core away; with one thread the two
agree on an idle machine); forward runs under ``torch.no_grad``, forward+backward computes every
gradient. The op's FLOPs are 2 per multiply-add of its seven k*k-tap contractions (logits,
output; value-, query-, key-, value- and embedding-gradients): ``14 N C H W k^2``.

Peak memory is the extra memory over the inputs during one forward+backward: on a GPU
``torch.cuda.max_memory_allocated``; on the CPU the process's peak resident set (``VmHWM``, reset
through ``/proc/self/clear_refs`` after the warm-up) minus the resident set before the run, in a
fresh subprocess per case with glibc's mmap threshold fixed so freed blocks go back to the system
(the figures include allocator and page granularity). Times come from another fresh subprocess
per case with glibc's default allocator settings (the fixed mmap threshold would make every large
allocation fault its pages in again). The 1-minute load average is recorded next to every case.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_local_attention.py          # CPU, writes the JSON
    OMP_NUM_THREADS=1 python benchmarks/bench_local_attention.py --quick  # tiny smoke run
    python benchmarks/bench_local_attention.py --device cuda

Writes ``benchmarks/results/local_attention_<device>.json`` and prints a Markdown table.
"""

import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import _common as common  # noqa: E402

SHAPES = [(2, 64, 56, 56), (2, 256, 28, 28)]
QUICK_SHAPES = [(1, 16, 14, 14)]
KERNEL_SIZE = 7
HEADS = 8
MM_SIZE = 2048


def op_flops(shape) -> int:
    """FLOPs of the op's forward+backward (2 per multiply-add, seven contractions)."""
    n, c, h, w = shape
    return 14 * n * c * h * w * KERNEL_SIZE**2


def _build(case: str, shape, device: str):
    """Two closures for one case: forward only, forward+backward."""
    from san_det.layers.local_attention import LocalSelfAttention2d, local_attention

    n, c, h, w = shape
    gen = torch.Generator().manual_seed(0)

    def randn(*size):
        return torch.randn(*size, generator=gen).to(device)

    if case == "mm":
        a, b = randn(MM_SIZE, MM_SIZE), randn(MM_SIZE, MM_SIZE)

        def product():
            torch.mm(a, b)

        return product, product

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


def measure(case: str, backend: str, shape, device: str, repeats: int, what: str) -> dict:
    """One case: ``what`` is "time" (medians) or "memory" (peak of one forward+backward); on the
    CPU each runs in a fresh process."""
    from san_det.layers.backend import use_backend

    with use_backend(None if case in ("conv3x3", "mm") else backend):
        forward, forward_backward = _build(case, shape, device)
        forward_backward()  # warm-up: compiles / loads the kernels, fills caches
        forward()
        if what == "memory":
            if device == "cuda":
                return {"peak_mb": round(common.cuda_peak_mb(forward_backward), 2)}
            if not common.reset_peak_rss():
                raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs)")
            base = common.status_mb("VmRSS")
            forward_backward()
            return {"peak_mb": round(common.status_mb("VmHWM") - base, 2)}
        times = common.forward_backward_times(
            forward, forward_backward, repeats, device, minimum=True
        )
    return {"case": case, "backend": backend, "shape": list(shape), **times}


def _rate_table(results, mm) -> str:
    """Op rows: FLOP rate and share of the same run's ``torch.mm`` rate, wall and CPU time."""
    lines = [
        f"| shape | backend | fwd+bwd ms (CPU ms) | GFLOP/s (by CPU time) | share of torch.mm "
        f"{MM_SIZE}^3 ({mm['gflops_cpu']:.0f} GFLOP/s by CPU time) | load |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        if r["case"] != "op":
            continue
        n, c, h, w = r["shape"]
        gflops = op_flops(r["shape"]) / r["forward_backward_cpu_ms"] / 1e6
        lines.append(
            f"| N{n} C{c} {h}x{w} | {r['backend']} | {r['forward_backward_ms']:.3g} "
            f"({r['forward_backward_cpu_ms']:.3g}) | {gflops:.1f} | "
            f"{100 * gflops / mm['gflops_cpu']:.1f}% | {r['load_average_1min']} |"
        )
    return "\n".join(lines)


def main() -> None:
    args = common.op_benchmark_args(__doc__.split("\n")[0], "one tiny shape, 2 repeats")
    if common.answer_child(args, measure, "case"):
        return
    shapes, repeats, backends = common.cases_to_run(args, SHAPES, QUICK_SHAPES)

    def run(case, backend, shape):
        spec = {"case": case, "backend": backend, "shape": list(shape), "repeats": repeats}
        on_gpu = lambda what: measure(case, backend, shape, "cuda", repeats, what)  # noqa: E731
        return common.time_and_memory(__file__, spec, args.device, on_gpu)

    load_before = os.getloadavg()
    mm = run("mm", "torch", (MM_SIZE,) * 4)
    mm["gflops"] = round(2 * MM_SIZE**3 / mm["forward_min_ms"] / 1e6, 1)
    mm["gflops_cpu"] = round(2 * MM_SIZE**3 / mm["forward_cpu_ms"] / 1e6, 1)
    results = []
    for shape in shapes:
        for case in ("op", "layer", "conv3x3"):
            for backend in backends if case != "conv3x3" else ["torch"]:
                results.append(run(case, backend, shape))
    mm_after = run("mm", "torch", (MM_SIZE,) * 4)
    mm["gflops_cpu_after"] = round(2 * MM_SIZE**3 / mm_after["forward_cpu_ms"] / 1e6, 1)
    for r in results:
        if r["case"] == "op":
            r["gflops_cpu"] = round(op_flops(r["shape"]) / r["forward_backward_cpu_ms"] / 1e6, 2)
            r["share_of_mm_cpu"] = round(r["gflops_cpu"] / mm["gflops_cpu"], 4)

    report = common.report_header(args, repeats, load_before)
    report.update(
        kernel_size=KERNEL_SIZE,
        num_heads=HEADS,
        dtype="float32",
        memory_method=(
            "cuda max_memory_allocated"
            if args.device == "cuda"
            else "VmHWM after clear_refs minus VmRSS, fresh process per case"
        ),
        mm=mm,
        results=results,
    )
    if args.quick:
        name = f"local_attention_{args.device}_quick.json"
    else:
        name = f"local_attention_{args.device}{f'_n{args.batch}' if args.batch else ''}.json"
    out = args.out or ROOT / "benchmarks" / "results" / name
    common.write_report(report, out)
    print(
        f"device {report['device_name']} ({report['cpu_isa']}), torch {torch.__version__}, "
        f"OMP_NUM_THREADS={report['OMP_NUM_THREADS']} (torch threads {report['torch_threads']}), "
        f"float32, k={KERNEL_SIZE}, {HEADS} heads, median of {repeats}, load average "
        f"{report['load_average_1min']}; wrote {out}\n"
    )
    print(common.ratio_table(results, "case"))
    print()
    print(_rate_table(results, mm))


if __name__ == "__main__":
    main()
