"""SASA's attention stem against the conv stem it replaces, side by side in one run.

At ``--batch`` x 3 x ``--size`` x ``--size`` (default 2 x 3 x 224 x 224), float32, training mode:

- ``conv stem``: ``Conv2d(3, 64, 7, stride 2, padding 3)`` + ``BatchNorm2d`` + ReLU +
  ``MaxPool2d(3, stride 2, padding 1)`` (ResNet's stem; output 56 x 56);
- ``attention stem (kernels)``: ``SpatiallyAwareAttentionStem(3, 64, block_size=4, num_heads=8)``
  as it runs on the CPU backend (compiled block-attention kernels); output 56 x 56;
- ``attention stem (tensor ops)``: the same module's ``forward_reference`` (plain tensor
  operations, what the reference backend, tracing and CUDA use; with a san_det that has no stem
  kernels, the module's forward);
- ``BatchNorm + 4x4 max pool``: the attention stem's norm and pool alone, on its full-resolution
  output (what any implementation of the paper's stem pays after the attention).

Forward (``torch.no_grad``) and forward+backward (gradients of the input and every parameter),
the cases interleaved round by round; medians of wall time and process CPU time, with the
1-minute load average.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_attention_stem.py

Writes ``benchmarks/results/attention_stem_cpu.json`` and prints a Markdown table.
"""

import argparse
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

from _common import cpu_name, write_report  # noqa: E402


def _cases(batch: int, size: int):
    import san_det  # noqa: F401
    from san_det.layers.attention_stem import SpatiallyAwareAttentionStem

    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size, requires_grad=True)
    conv = nn.Sequential(
        nn.Conv2d(3, 64, 7, 2, 3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, 1),
    ).train()
    stem = SpatiallyAwareAttentionStem(3, 64, block_size=4, num_heads=8).train()
    norm_pool = nn.Sequential(nn.BatchNorm2d(64), nn.MaxPool2d(4, 4)).train()
    full_res = torch.randn(batch, 64, size, size, requires_grad=True)
    cases = {"conv stem": (conv, conv, x)}
    if hasattr(stem, "forward_reference"):  # (a san_det without the stem kernels has neither)
        if not stem._kernels_apply(x):
            raise SystemExit("the attention stem's CPU kernels do not apply here (no compiler?)")
        cases["attention stem (kernels)"] = (stem, stem, x)
        cases["attention stem (tensor ops)"] = (stem, stem.forward_reference, x)
    else:
        cases["attention stem (tensor ops)"] = (stem, stem, x)
    cases["BatchNorm + 4x4 max pool"] = (norm_pool, norm_pool, full_res)
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks/results/attention_stem_cpu.json"
    )
    args = parser.parse_args()

    cases = _cases(args.batch, args.size)
    runs = {}
    for name, (module, forward, x) in cases.items():
        leaves = [x, *module.parameters()]

        def fwd(forward=forward, x=x):
            with torch.no_grad():
                forward(x)

        def fwd_bwd(forward=forward, x=x, leaves=leaves):
            out = forward(x)
            torch.autograd.grad(out, leaves, torch.ones_like(out))

        fwd_bwd()  # warm-up: compiles / loads the kernels
        runs[name] = (fwd, fwd_bwd)
    samples = {name: {"fwd": [], "fwd_bwd": [], "fwd_cpu": [], "fwd_bwd_cpu": []} for name in runs}
    loads = []
    for _ in range(args.repeats):
        for name, (fwd, fwd_bwd) in runs.items():
            for key, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
                start, start_cpu = time.perf_counter(), time.process_time()
                fn()
                samples[name][key].append((time.perf_counter() - start) * 1e3)
                samples[name][key + "_cpu"].append((time.process_time() - start_cpu) * 1e3)
        loads.append(round(os.getloadavg()[0], 2))
    results = [
        {"case": name, **{f"{k}_ms": round(statistics.median(v), 2) for k, v in s.items()}}
        for name, s in samples.items()
    ]
    conv = results[0]
    for r in results:
        r["fwd_bwd_vs_conv_stem"] = round(r["fwd_bwd_ms"] / conv["fwd_bwd_ms"], 2)
        r["fwd_bwd_cpu_vs_conv_stem"] = round(r["fwd_bwd_cpu_ms"] / conv["fwd_bwd_cpu_ms"], 2)
    report = {
        "device_name": cpu_name(),
        "torch": torch.__version__,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "input": [args.batch, 3, args.size, args.size],
        "dtype": "float32",
        "repeats": args.repeats,
        "load_average_1min_per_round": loads,
        "results": results,
    }
    write_report(report, args.out)
    print(
        f"{report['device_name']}, torch {torch.__version__}, OMP_NUM_THREADS="
        f"{report['OMP_NUM_THREADS']}, input {report['input']}, medians of {args.repeats} rounds, "
        f"load average per round {loads}; wrote {args.out}\n"
    )
    print("| case | fwd ms (CPU ms) | fwd+bwd ms (CPU ms) | fwd+bwd vs conv stem (CPU) |")
    print("|---|---|---|---|")
    for r in results:
        print(
            f"| {r['case']} | {r['fwd_ms']:.1f} ({r['fwd_cpu_ms']:.1f}) | {r['fwd_bwd_ms']:.1f} "
            f"({r['fwd_bwd_cpu_ms']:.1f}) | {r['fwd_bwd_vs_conv_stem']:.2f}x "
            f"({r['fwd_bwd_cpu_vs_conv_stem']:.2f}x) |"
        )


if __name__ == "__main__":
    main()
