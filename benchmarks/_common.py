"""Shared by the benchmarks: process and machine readings (Linux /proc) and the ratio table."""

import platform

__all__ = ["status_mb", "reset_peak_rss", "cpu_name", "ratio_table"]


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


def ratio_table(results, label: str, baseline: str = "reference") -> str:
    """Markdown table of benchmark rows with ratios measured side by side in the same run.

    Args:
        results: dicts with ``shape``, ``label`` (e.g. "op"), ``backend``, ``forward_ms``,
            ``forward_backward_ms``, ``peak_mb``; every shape has a ``conv3x3`` row.
        label: the key naming what a row measures ("op" or "case").
        baseline: the backend the speed and memory ratios are taken against.
    """
    lines = [
        f"| shape | {label} | backend | fwd ms | fwd+bwd ms | peak MB | fwd+bwd speedup vs "
        f"{baseline} | memory vs {baseline} | fwd+bwd / conv3x3 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        shape = tuple(r["shape"])
        same = [q for q in results if tuple(q["shape"]) == shape and q[label] == r[label]]
        ref = next((q for q in same if q["backend"] == baseline), None)
        conv = next(q for q in results if tuple(q["shape"]) == shape and q[label] == "conv3x3")
        speed = mem = "-"
        if ref is not None and r is not ref:
            speed = f"{ref['forward_backward_ms'] / r['forward_backward_ms']:.1f}x"
            mem = f"{ref['peak_mb'] / max(r['peak_mb'], 1e-3):.1f}x less"
        vs_conv = f"{r['forward_backward_ms'] / conv['forward_backward_ms']:.2f}"
        n, c, h, w = shape
        lines.append(
            f"| N{n} C{c} {h}x{w} | {r[label]} | {r['backend']} | {r['forward_ms']:.3g} | "
            f"{r['forward_backward_ms']:.3g} | {r['peak_mb']:.1f} | {speed} | {mem} | {vs_conv} |"
        )
    return "\n".join(lines)
