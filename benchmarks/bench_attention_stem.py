"""SASA's attention stem against the conv stem it replaces, side by side in one run.

At ``--batch`` x 3 x S x S for each ``--sizes`` S (default 224, ImageNet, and 640, SASA's
detection crop), float32, training mode:

- ``conv stem``: ``Conv2d(3, 64, 7, stride 2, padding 3)`` + ``BatchNorm2d`` + ReLU +
  ``MaxPool2d(3, stride 2, padding 1)`` (ResNet's stem; output S/4 x S/4);
- ``attention stem``: ``SpatiallyAwareAttentionStem(3, 64, block_size=4, num_heads=8)``: its
  forward, the op ``san_det::attention_stem_pool`` (attention, pooling by the norm's sign and
  the channel sums in the kernels, no full-resolution output) and the BatchNorm on the pooled
  tensor; output S/4 x S/4;
- ``attention stem (op + fused norm and pool)``: the same module as ``norm_max_pool(attention(x))``:
  the op ``san_det::attention_stem`` writing the full-resolution output, then
  :func:`~san_det.layers.norm_pool.norm_max_pool` (the stem's forward before
  ``attention_stem_pool``);
- ``attention stem (op reference backend)``: the same module with the op's ``reference`` backend
  (its chunked tensor operations, the op before it had kernels);
- ``attention stem (unfused norm + pool)``: the same module with ``pool(norm(attention(x)))``
  as separate modules (what ``forward`` did before :mod:`san_det.layers.norm_pool`);
- ``attention stem (tensor ops)``: the same module's ``forward_reference`` (the readable
  reference the op replaced, norm and pool unfused; sizes up to ``--reference-max-size`` only,
  it is slow and large);
- ``BatchNorm + 4x4 max pool``: the attention stem's norm and pool alone, as the two modules, on
  its full-resolution output (what a plain implementation of the paper's stem pays after the
  attention);
- ``fused BatchNorm + 4x4 max pool``: the same through
  :func:`~san_det.layers.norm_pool.norm_max_pool` (what the stem's ``forward`` runs).

Forward (``torch.no_grad``) and forward+backward (gradients of the input and every parameter),
the cases interleaved round by round in this process: medians of wall time and process CPU
time, with the 1-minute load average per round. Peak extra memory of one forward+backward: each
case in a fresh process with glibc's mmap threshold fixed (freed memory goes back to the system),
peak resident set minus the resident set before, after a warm-up pass.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_attention_stem.py [--quick]

Writes ``benchmarks/results/attention_stem_cpu.json`` and prints a Markdown table.
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import cpu_name, reset_peak_rss, run_child, status_mb, write_report  # noqa: E402

CASES = (
    "conv stem",
    "attention stem",
    "attention stem (op + fused norm and pool)",
    "attention stem (op reference backend)",
    "attention stem (unfused norm + pool)",
    "attention stem (tensor ops)",
    "BatchNorm + 4x4 max pool",
    "fused BatchNorm + 4x4 max pool",
)


def _case(name: str, batch: int, size: int):
    """``(module, forward, input)`` of one case."""
    import san_det  # noqa: F401
    from san_det.layers.attention_stem import SpatiallyAwareAttentionStem
    from san_det.layers.norm_pool import norm_max_pool

    torch.manual_seed(0)
    if name.endswith("BatchNorm + 4x4 max pool"):
        norm, pool = nn.BatchNorm2d(64), nn.MaxPool2d(4, 4)
        module = nn.Sequential(norm, pool).train()
        forward = (lambda t: norm_max_pool(t, norm, pool)) if name.startswith("fused") else module
        return module, forward, torch.randn(batch, 64, size, size, requires_grad=True)
    x = torch.randn(batch, 3, size, size, requires_grad=True)
    if name == "conv stem":
        module = nn.Sequential(
            nn.Conv2d(3, 64, 7, 2, 3, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        ).train()
        return module, module, x
    stem = SpatiallyAwareAttentionStem(3, 64, block_size=4, num_heads=8).train()
    forward = {
        "attention stem": stem,
        "attention stem (op + fused norm and pool)": lambda t: norm_max_pool(
            stem.attention(t), stem.norm, stem.pool
        ),
        "attention stem (op reference backend)": _on_reference_backend(stem),
        "attention stem (unfused norm + pool)": lambda t: stem.pool(stem.norm(stem.attention(t))),
        "attention stem (tensor ops)": stem.forward_reference,
    }[name]
    return stem, forward, x


def _on_reference_backend(stem):
    from san_det.layers.backend import use_backend

    def forward(x):
        with use_backend("reference"):  # the backward runs on the backend its forward ran on
            return stem(x)

    return forward


def _passes(module, forward, x):
    leaves = [x, *module.parameters()]

    def fwd():
        with torch.no_grad():
            forward(x)

    def fwd_bwd():
        out = forward(x)
        torch.autograd.grad(out, leaves, torch.ones_like(out))

    return fwd, fwd_bwd


def _peak_extra_mb(name: str, batch: int, size: int) -> dict:
    """In a fresh process: peak resident set of one forward+backward beyond what was there."""
    _, fwd_bwd = _passes(*_case(name, batch, size))
    fwd_bwd()  # warm-up (libraries, allocator)
    before = status_mb("VmRSS")
    if not reset_peak_rss():
        raise SystemExit("cannot reset the peak resident set (/proc/self/clear_refs)")
    fwd_bwd()
    return {"peak_extra_mb": round(status_mb("VmHWM") - before, 1)}


def _time(names, batch: int, size: int, repeats: int) -> dict:
    runs = {}
    for name in names:
        fwd, fwd_bwd = _passes(*_case(name, batch, size))
        fwd_bwd()  # warm-up
        runs[name] = (fwd, fwd_bwd)
    samples = {name: {"fwd": [], "fwd_bwd": [], "fwd_cpu": [], "fwd_bwd_cpu": []} for name in runs}
    loads = []
    for _ in range(repeats):
        for name, (fwd, fwd_bwd) in runs.items():
            for key, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
                start, start_cpu = time.perf_counter(), time.process_time()
                fn()
                samples[name][key].append((time.perf_counter() - start) * 1e3)
                samples[name][key + "_cpu"].append((time.process_time() - start_cpu) * 1e3)
        loads.append(round(os.getloadavg()[0], 2))
    results = {
        name: {f"{k}_ms": round(statistics.median(v), 2) for k, v in s.items()}
        for name, s in samples.items()
    }
    return {"results": results, "load_average_1min_per_round": loads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 640])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="2 rounds")
    parser.add_argument("--reference-max-size", type=int, default=224)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks/results/attention_stem_cpu.json"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(_peak_extra_mb(spec["case"], spec["batch"], spec["size"])))
        return
    repeats = 2 if args.quick else args.repeats

    load_before = os.getloadavg()[0]
    rows = []
    for size in args.sizes:
        names = [n for n in CASES if "tensor ops" not in n or size <= args.reference_max_size]
        timed = _time(names, args.batch, size, repeats)
        for name in names:
            spec = {"case": name, "batch": args.batch, "size": size}
            memory = run_child(__file__, spec, memory=True)
            row = {"input": [args.batch, 3, size, size], "case": name}
            row.update(timed["results"][name], **memory)
            row["load_average_1min_per_round"] = timed["load_average_1min_per_round"]
            rows.append(row)
        conv = next(r for r in rows if r["input"][2] == size and r["case"] == "conv stem")
        for r in rows:
            if r["input"][2] == size:
                for key in ("fwd_bwd_ms", "fwd_bwd_cpu_ms", "peak_extra_mb"):
                    name = key.replace("_ms", "").replace("_mb", "")
                    r[f"{name}_vs_conv_stem"] = round(r[key] / max(conv[key], 1e-3), 2)
    report = {
        "device_name": cpu_name(),
        "torch": torch.__version__,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "torch_threads": torch.get_num_threads(),
        "dtype": "float32",
        "repeats": repeats,
        "load_average_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "results": rows,
    }
    write_report(report, args.out)
    print(
        f"{report['device_name']}, torch {torch.__version__}, OMP_NUM_THREADS="
        f"{report['OMP_NUM_THREADS']}, medians of {repeats} rounds, load average before/after "
        f"{report['load_average_1min_before_after']}; wrote {args.out}\n"
    )
    print(
        "| input | case | fwd ms (CPU) | fwd+bwd ms (CPU) | fwd+bwd vs conv stem: wall (CPU) | "
        "peak extra MB (vs conv stem) | load per round |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {'x'.join(map(str, r['input']))} | {r['case']} | {r['fwd_ms']:.1f} "
            f"({r['fwd_cpu_ms']:.1f}) | {r['fwd_bwd_ms']:.1f} ({r['fwd_bwd_cpu_ms']:.1f}) | "
            f"{r['fwd_bwd_vs_conv_stem']:.2f}x ({r['fwd_bwd_cpu_vs_conv_stem']:.2f}x) | "
            f"{r['peak_extra_mb']:.1f} ({r['peak_extra_vs_conv_stem']:.2f}x) | "
            f"{r['load_average_1min_per_round']} |"
        )


if __name__ == "__main__":
    main()
