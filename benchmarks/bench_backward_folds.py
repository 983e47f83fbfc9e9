"""The two deterministic backward pieces against what they replaced, side by side in one run.

- ``reflect_fold``: the gradient of reflection padding (``ops/reflect.py``, slice additions)
  against aten's ``reflection_pad2d_backward`` (atomics on CUDA), gradients of
  (N, C, H + 2p, W + 2p) with p = 3 (SAN's k = 7).
- ``rel_grad``: SASA's per-image ``grad_rel`` as chunked products (``ops/rel_gradient.py``, the
  CUDA path) against the former single product over a reordered copy of the whole ``dlogit``
  (q (N, C, H, W), 8 heads, k = 7, dlogit float32).

Each is timed (median of ``--repeats`` after a warm-up, wall and process CPU time); on a GPU the
peak extra memory (``torch.cuda.max_memory_allocated``) is recorded too. The 1-minute load average
is recorded before and after.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_backward_folds.py --quick
    python benchmarks/bench_backward_folds.py --device cuda [--batch 16]

Results go to ``benchmarks/results/backward_folds_<device>.json`` and a table to stdout.
"""

import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import _common as common  # noqa: E402

FOLD_SHAPES = [(2, 64, 56, 56), (2, 256, 28, 28)]
REL_SHAPES = [(2, 64, 56, 56), (2, 256, 28, 28)]
PAD, HEADS, KERNEL_SIZE = 3, 8, 7


def _aten_fold(grad, pad):
    n, c, h, w = grad.shape
    like = grad.new_empty(n, c, h - 2 * pad, w - 2 * pad)
    return torch.ops.aten.reflection_pad2d_backward(grad, like, [pad] * 4)


def _rel_grad_full_copy(q, dlogit, num_heads):
    """The former CUDA formula: one product per image and head over a reordered dlogit."""
    n, c, h, w = q.shape
    kk = dlogit.shape[3]
    planes = dlogit.permute(0, 1, 3, 2, 4).reshape(n * num_heads, kk, h * w)
    q_heads = q.reshape(n * num_heads, c // num_heads, h * w).to(dlogit.dtype)
    return torch.bmm(q_heads, planes.transpose(1, 2)).view(n, c, kk)


def _measure(name, fn, device, repeats):
    sync = torch.cuda.synchronize if device == "cuda" else None
    fn()
    wall, best, cpu = common.times_ms(fn, repeats, sync)
    row = {"case": name, "wall_ms": round(wall, 3), "min_ms": round(best, 3)}
    row["cpu_ms"] = round(cpu, 3)
    if device == "cuda":
        row["peak_extra_mb"] = round(common.cuda_peak_mb(fn), 2)
    return row


def main():
    from san_det.layers.ops.reflect import reflection_pad_backward
    from san_det.layers.ops.rel_gradient import rel_grad_per_image

    args = common.op_benchmark_args(__doc__.splitlines()[0], "first shape of each, 3 repeats")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device")
    repeats = args.repeats or (3 if args.quick else 10)
    fold_shapes, rel_shapes = FOLD_SHAPES, REL_SHAPES
    if args.quick:
        fold_shapes, rel_shapes = FOLD_SHAPES[:1], REL_SHAPES[:1]
    if args.batch:
        fold_shapes = [(args.batch, *s[1:]) for s in fold_shapes]
        rel_shapes = [(args.batch, *s[1:]) for s in rel_shapes]
    report = common.report_header(args, repeats, os.getloadavg())
    gen = torch.Generator().manual_seed(0)
    rows = []
    for n, c, h, w in fold_shapes:
        grad = torch.randn(n, c, h + 2 * PAD, w + 2 * PAD, generator=gen).to(args.device)
        label = f"reflect_fold N{n} C{c} {h}x{w} p{PAD}"
        rows.append(_measure(f"{label} aten", lambda: _aten_fold(grad, PAD), args.device, repeats))
        slices = lambda: reflection_pad_backward(grad, PAD)  # noqa: E731
        rows.append(_measure(f"{label} slices", slices, args.device, repeats))
    for n, c, h, w in rel_shapes:
        q = torch.randn(n, c, h, w, generator=gen).to(args.device)
        kk = KERNEL_SIZE * KERNEL_SIZE
        dlogit = torch.randn(n, HEADS, h, kk, w, generator=gen).to(args.device)
        label = f"rel_grad N{n} C{c} {h}x{w} heads{HEADS} k{KERNEL_SIZE}"
        full = lambda: _rel_grad_full_copy(q, dlogit, HEADS)  # noqa: E731
        rows.append(_measure(f"{label} full copy", full, args.device, repeats))
        chunked = lambda: rel_grad_per_image(q, dlogit, HEADS)  # noqa: E731
        rows.append(_measure(f"{label} chunked", chunked, args.device, repeats))
        rows[-1]["dlogit_mb"] = round(dlogit.nbytes / 2**20, 2)
    report["results"] = rows
    report["load_average_1min"][1] = round(os.getloadavg()[0], 2)
    out = args.out or ROOT / "benchmarks" / "results" / f"backward_folds_{args.device}.json"
    common.write_report(report, out)
    print(f"{report['device_name']}, OMP_NUM_THREADS={report['OMP_NUM_THREADS']}, "
          f"load {report['load_average_1min']}")  # fmt: skip
    print("| case | wall ms | min ms | CPU ms | peak extra MB |\n|---|---|---|---|---|")
    for r in rows:
        peak = r.get("peak_extra_mb", "-")
        print(f"| {r['case']} | {r['wall_ms']} | {r['min_ms']} | {r['cpu_ms']} | {peak} |")


if __name__ == "__main__":
    main()
