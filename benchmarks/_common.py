"""Shared by the benchmarks: process and machine readings (Linux /proc), timing, fresh child
processes per case, and the ratio table."""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

__all__ = [
    "status_mb",
    "reset_peak_rss",
    "cpu_name",
    "times_ms",
    "forward_backward_times",
    "cuda_peak_mb",
    "run_child",
    "ratio_table",
    "op_benchmark_args",
    "answer_child",
    "cases_to_run",
    "report_header",
    "write_report",
]


def status_mb(field: str) -> float:
    """A memory field of /proc/self/status (e.g. "VmRSS", "VmHWM") in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_name() -> str:
    """The processor's model name, for the results file."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def times_ms(fn, repeats: int, sync=None):
    """``(median wall, min wall, median process CPU time)`` of ``repeats`` calls, in ms (``sync``
    is called around each call, e.g. ``torch.cuda.synchronize``)."""
    wall, cpu = [], []
    for _ in range(repeats):
        if sync:
            sync()
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        if sync:
            sync()
        wall.append((time.perf_counter() - start) * 1e3)
        cpu.append((time.process_time() - start_cpu) * 1e3)
    return statistics.median(wall), min(wall), statistics.median(cpu)


def forward_backward_times(forward, forward_backward, repeats: int, device: str, minimum=False):
    """A result row's timing fields: the median wall (with ``minimum`` also the fastest) and CPU
    ms of ``forward`` and of ``forward_backward`` over ``repeats`` calls each, then the 1-minute
    load average."""
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else None
    fwd, fwd_min, fwd_cpu = times_ms(forward, repeats, sync)
    fwd_bwd, fwd_bwd_min, fwd_bwd_cpu = times_ms(forward_backward, repeats, sync)
    row = {"forward_ms": round(fwd, 3), "forward_backward_ms": round(fwd_bwd, 3)}
    if minimum:
        row["forward_min_ms"] = round(fwd_min, 3)
        row["forward_backward_min_ms"] = round(fwd_bwd_min, 3)
    row["forward_cpu_ms"] = round(fwd_cpu, 3)
    row["forward_backward_cpu_ms"] = round(fwd_bwd_cpu, 3)
    row["load_average_1min"] = round(os.getloadavg()[0], 2)
    return row


def cuda_peak_mb(fn) -> float:
    """MiB allocated on the current CUDA device during ``fn()`` beyond what was allocated before."""
    import torch

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def run_child(script: str, spec: dict, memory: bool) -> dict:
    """Run ``script --child SPEC`` in a fresh process and return the JSON of its last line.

    ``memory``: with glibc's mmap threshold fixed so freed blocks go back to the system (the peak
    resident set is then the peak of live memory); timing children keep the default allocator
    (with the fixed threshold every large allocation would fault its pages in again).
    """
    env = dict(os.environ)
    if memory:
        env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    proc = subprocess.run(
        [sys.executable, script, "--child", json.dumps(spec)],
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark case {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def time_and_memory(script: str, spec: dict, device: str, measure) -> dict:
    """One benchmark case, timed and its peak memory measured: on the GPU in this process
    (``measure(what)`` with what "time" or "memory"), on the CPU each in a fresh child
    (:func:`run_child`); the result is also printed to stderr as JSON."""
    if device == "cuda":
        result = measure("time")
        result.update(measure("memory"))
    else:
        result = run_child(script, dict(spec, what="time"), memory=False)
        result.update(run_child(script, dict(spec, what="memory"), memory=True))
    print(json.dumps(result), file=sys.stderr, flush=True)
    return result


def ratio_table(results, label: str, baseline: str = "reference") -> str:
    """Markdown table of benchmark rows with ratios measured side by side in the same run.

    Args:
        results: dicts with ``shape``, ``label`` (e.g. "op"), ``backend``, ``forward_ms``,
            ``forward_backward_ms``, ``peak_mb`` and, where measured, ``forward_backward_cpu_ms``
            (process CPU time) and ``load_average_1min``; every shape has a ``conv3x3`` row.
        label: the key naming what a row measures ("op" or "case").
        baseline: the backend the speed and memory ratios are taken against.

    Ratios are of wall times, with the ratio of CPU times in parentheses where both rows have it.
    """
    lines = [
        f"| shape | {label} | backend | fwd ms | fwd+bwd ms (CPU ms) | peak MB | fwd+bwd speedup "
        f"vs {baseline} | memory vs {baseline} | fwd+bwd / conv3x3 | load |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def ratio(a, b, key):
        text = f"{a[key] / b[key]:.2f}"
        if a.get(key.replace("_ms", "_cpu_ms")) and b.get(key.replace("_ms", "_cpu_ms")):
            cpu_key = key.replace("_ms", "_cpu_ms")
            text += f" ({a[cpu_key] / b[cpu_key]:.2f})"
        return text

    for r in results:
        shape = tuple(r["shape"])
        same = [q for q in results if tuple(q["shape"]) == shape and q[label] == r[label]]
        ref = next((q for q in same if q["backend"] == baseline), None)
        conv = next(q for q in results if tuple(q["shape"]) == shape and q[label] == "conv3x3")
        speed = mem = "-"
        if ref is not None and r is not ref:
            speed = ratio(ref, r, "forward_backward_ms") + "x"
            mem = f"{ref['peak_mb'] / max(r['peak_mb'], 1e-3):.1f}x less"
        vs_conv = ratio(r, conv, "forward_backward_ms")
        cpu = f" ({r['forward_backward_cpu_ms']:.3g})" if r.get("forward_backward_cpu_ms") else ""
        n, c, h, w = shape
        lines.append(
            f"| N{n} C{c} {h}x{w} | {r[label]} | {r['backend']} | {r['forward_ms']:.3g} | "
            f"{r['forward_backward_ms']:.3g}{cpu} | {r['peak_mb']:.1f} | {speed} | {mem} | "
            f"{vs_conv} | {r.get('load_average_1min', '-')} |"
        )
    return "\n".join(lines)


def op_benchmark_args(description: str, quick_help: str) -> argparse.Namespace:
    """The command line shared by the op benchmarks (``--child`` is the fresh process per case)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None, help="override N of every shape")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser.parse_args()


def answer_child(args: argparse.Namespace, measure, case_key: str) -> bool:
    """In a ``--child`` process: measure the one case on the CPU, print it as JSON, return True."""
    if not args.child:
        return False
    spec = json.loads(args.child)
    result = measure(
        spec[case_key], spec["backend"], spec["shape"], "cpu", spec["repeats"], spec["what"]
    )
    print(json.dumps(result))
    return True


def cases_to_run(args: argparse.Namespace, shapes, quick_shapes):
    """``(shapes, repeats, backends)`` for the command line; exits without a CUDA device."""
    import torch
    from san_det.layers.kernel_runtime import cpu_compiler_available

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device")
    shapes = quick_shapes if args.quick else shapes
    if args.batch:
        shapes = [(args.batch, *shape[1:]) for shape in shapes]
    repeats = args.repeats or (2 if args.quick else (20 if args.device == "cuda" else 5))
    if args.device == "cuda":
        backends = ["reference", "cuda"]
    else:
        backends = ["reference"] + (["cpu"] if cpu_compiler_available() else [])
    return shapes, repeats, backends


def report_header(args: argparse.Namespace, repeats: int, load_before) -> dict:
    """What every result file records first: device, ISA level, torch, threads, load."""
    import torch
    from san_det.layers import kernel_runtime

    # (Runtimes before ISA levels existed have no cpu_isa: the benchmarks also run on them.)
    cpu_isa = getattr(kernel_runtime, "cpu_isa", lambda: None)
    return {
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else cpu_name(),
        "cpu_isa": cpu_isa() if args.device == "cpu" else None,
        "torch": torch.__version__,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "torch_threads": torch.get_num_threads(),
        "repeats": repeats,
        "quick": args.quick,
        # Other processes share this machine's CPUs: the 1-minute load before and after.
        "load_average_1min": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
    }


def write_report(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
