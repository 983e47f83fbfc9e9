"""Threads: speed of the compiled kernels with 1 and 2 threads, and what a 2-thread call leaves
behind for the 1-thread calls after it.

For the SASA op (N2 C64 56x56, k 7, 8 heads), SAN's aggregation (same shape, reflection) and, as
the baseline that uses the same OpenMP runtime, ``nn.Conv2d(64, 64, 3)``, all fwd+bwd in float32:

- ``1 thread`` / ``2 threads``: median wall and process CPU time with ``torch.set_num_threads``;
- ``1 thread after 2``: a call with 1 thread made right after a call with 2: its CPU time over
  its wall time. OpenMP workers that keep spinning after the 2-thread call show up as a ratio
  above 1 (libgomp spins for a while before it sleeps unless ``OMP_WAIT_POLICY=PASSIVE``).

The kernels run their launch grid in an ``omp parallel for`` of the OpenMP runtime torch loaded
(one pool, sized by ``torch.set_num_threads``). Run without ``OMP_NUM_THREADS`` pinning to 1 if
you want the 2-thread figures to use 2 cores (``torch.set_num_threads(2)`` is called either way).

Usage::

    python benchmarks/bench_threads.py        # writes benchmarks/results/threads_cpu.json
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import cpu_name, write_report  # noqa: E402


def _cases():
    import san_det  # noqa: F401
    from san_det.layers.backend import use_backend
    from san_det.layers.ops import aggregation, local_attention

    gen = torch.Generator().manual_seed(0)
    n, c, h, w = 2, 64, 56, 56
    q, k, v = (torch.randn(n, c, h, w, generator=gen).requires_grad_() for _ in range(3))
    rel = torch.randn(c, 7, 7, generator=gen).requires_grad_()
    wt = torch.randn(n, c // 8, 49, h * w, generator=gen).softmax(2).requires_grad_()
    conv = torch.nn.Conv2d(c, c, 3, padding=1, bias=False)
    grad = torch.randn(n, c, h, w, generator=gen)

    def op():
        with use_backend("cpu"):
            out = local_attention(q, k, v, rel, num_heads=8, kernel_size=7)
        torch.autograd.grad(out, [q, k, v, rel], grad)

    def agg():
        with use_backend("cpu"):
            out = aggregation(q, wt, 7, 1, 3, 1, "reflect")
        torch.autograd.grad(out, [q, wt], grad)

    def conv3x3():
        torch.autograd.grad(conv(q), [q, *conv.parameters()], grad)

    return {"local_attention": op, "aggregation": agg, "conv3x3": conv3x3}


def _timed(fn, threads: int):
    torch.set_num_threads(threads)
    start, start_cpu = time.perf_counter(), time.process_time()
    fn()
    return (time.perf_counter() - start) * 1e3, (time.process_time() - start_cpu) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/threads_cpu.json")
    args = parser.parse_args()

    results = []
    for name, fn in _cases().items():
        for threads in (1, 2):
            _timed(fn, threads)  # warm-up per thread count
        samples = {"1": [], "2": [], "after": []}
        for _ in range(args.repeats):
            samples["1"].append(_timed(fn, 1))
            samples["2"].append(_timed(fn, 2))
            samples["after"].append(_timed(fn, 1))  # right after the 2-thread call
        row = {"case": name, "load_average_1min": round(os.getloadavg()[0], 2)}
        for key, label in (("1", "1_thread"), ("2", "2_threads")):
            row[f"{label}_wall_ms"] = round(statistics.median(s[0] for s in samples[key]), 2)
            row[f"{label}_cpu_ms"] = round(statistics.median(s[1] for s in samples[key]), 2)
        row["speedup_2_threads"] = round(row["1_thread_wall_ms"] / row["2_threads_wall_ms"], 2)
        row["cpu_over_wall_1_thread"] = round(statistics.median(c / w for w, c in samples["1"]), 3)
        row["cpu_over_wall_1_thread_after_2"] = round(
            statistics.median(c / w for w, c in samples["after"]), 3
        )
        results.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    torch.set_num_threads(1)
    report = {
        "device_name": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        "repeats": args.repeats,
        "results": results,
    }
    write_report(report, args.out)
    print(
        f"{report['device_name']} ({os.cpu_count()} CPUs), torch {torch.__version__}, "
        f"OMP_NUM_THREADS={report['OMP_NUM_THREADS']}, OMP_WAIT_POLICY="
        f"{report['OMP_WAIT_POLICY']}, medians of {args.repeats}; wrote {args.out}\n"
    )
    print("| case | 1 thread ms (CPU) | 2 threads ms (CPU) | speed-up | CPU/wall, 1 thread | "
          "CPU/wall, 1 thread right after 2 | load |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['case']} | {r['1_thread_wall_ms']:.1f} ({r['1_thread_cpu_ms']:.1f}) | "
            f"{r['2_threads_wall_ms']:.1f} ({r['2_threads_cpu_ms']:.1f}) | "
            f"{r['speedup_2_threads']:.2f}x | {r['cpu_over_wall_1_thread']:.2f} | "
            f"{r['cpu_over_wall_1_thread_after_2']:.2f} | {r['load_average_1min']} |"
        )


if __name__ == "__main__":
    main()
