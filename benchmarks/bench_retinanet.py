"""RetinaNet train-step and inference time and peak memory: R50, SASA-50, attention everywhere.

Models (configs/COCO-Detection): ``retinanet_R_50_FPN_1x`` (conv baseline), ``retinanet_sasa50``
(conv stem + attention backbone), ``retinanet_sasa50_full_attention`` (attention stem + attention
backbone, conv FPN and head) and ``retinanet_sasa50_attention_fpn_head`` (full-attention
backbone, attentional FPN and head), all with 80 classes, side by side in one run on the same
input (``--batch`` images of ``--size x --size`` with 3 boxes each, fixed seed). Two cases:
batch 2 at 256x256 (the default) and batch 1 at 640x640 (``--size 640 --batch 1``, COCO's
detection size); each ratio to R50 is printed beside the issue's targets for
``retinanet_sasa50_attention_fpn_head`` (:data:`TARGETS`, process CPU time).

- train step: forward with losses, backward and an SGD step (``model.train()``), median of
  ``--repeats`` steps after ``--warmup`` steps (wall and process CPU time, with the 1-minute load
  average);
- inference: ``model.eval()`` forward under ``torch.no_grad`` (post-processing included), median
  wall and CPU time;
- peak memory: the process's peak resident set (``VmHWM``, reset via ``/proc/self/clear_refs``
  after the warm-up) minus the resident set before the measured train steps, each model in a
  fresh subprocess (so models do not share allocator state); includes allocator granularity;
- above the bottom-up network: the train step's and inference's CPU time without the bottom-up
  backbone (its features cached): what the FPN, the head, the losses and post-processing cost;
- profile: one training step under ``torch.profiler``, the ops with the most self CPU time and the
  share of time inside san_det's attention ops (forward and backward).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_retinanet.py           # writes the JSON
    OMP_NUM_THREADS=1 python benchmarks/bench_retinanet.py --quick   # tiny smoke run, no JSON
    OMP_NUM_THREADS=1 python benchmarks/bench_retinanet.py --size 640 --batch 1 --repeats 2
    OMP_NUM_THREADS=1 python benchmarks/bench_retinanet.py --models Demo/shapes_retinanet \
        --batch 16 --size 128 --out benchmarks/results/demo_train_step_cpu.json  # the demo

Writes ``benchmarks/results/retinanet_cpu.json`` (``retinanet_cpu_<batch>x<size>.json`` for
another case) and prints a Markdown table.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import cpu_name, reset_peak_rss, status_mb  # noqa: E402

MODELS = (
    "retinanet_R_50_FPN_1x",
    "retinanet_sasa50",
    "retinanet_sasa50_full_attention",
    "retinanet_sasa50_attention_fpn_head",
)
DEFAULT_CASE = (2, 256)  # (batch, size) written to retinanet_cpu.json
# Issue 16's targets: model -> {measured key: largest ratio to R50's (MODELS[0]) figure}.
TARGETS = {
    "retinanet_sasa50_attention_fpn_head": {
        "train_step_cpu_s": 1.0,
        "inference_cpu_s": 1.5,
        "train_peak_extra_mb": 2.0,
    }
}
# Other configs (paths under configs/) that --models accepts, e.g. the CPU demo's model:
# --models Demo/shapes_retinanet --batch 16 --size 128 (its training batch and image size).
EXTRA_MODELS = ("Demo/shapes_retinanet",)
# san_det's registered ops (torch.ops.san_det.*: SASA's local attention, SAN's subtraction and
# aggregation, their backward ops) appear in the profile under their qualified names.
ATTENTION_OP_PREFIX = "san_det::"
ATTENTION_NODE_PREFIX = "GeneratedBackwardFor_san_det_"


def _config_path(name: str) -> Path:
    coco = ROOT / "configs" / "COCO-Detection" / f"{name}.yaml"
    return coco if coco.exists() else ROOT / "configs" / f"{name}.yaml"


def _inputs(batch: int, size: int, num_classes: int):
    import torch
    from detectron2.structures import Boxes, Instances

    g = torch.Generator().manual_seed(0)
    inputs = []
    for _ in range(batch):
        inst = Instances((size, size))
        xy = torch.rand(3, 2, generator=g) * size * 0.6
        wh = (torch.rand(3, 2, generator=g) * 0.3 + 0.1) * size
        inst.gt_boxes = Boxes(torch.cat([xy, xy + wh], dim=1))
        inst.gt_classes = torch.randint(0, num_classes, (3,), generator=g)
        image = torch.rand(3, size, size, generator=g) * 255
        inputs.append({"image": image, "instances": inst, "height": size, "width": size})
    return inputs


def _median_time(fn, repeats: int):
    """Median wall and process CPU time of ``repeats`` calls, in seconds."""
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def run_one(name: str, batch: int, size: int, warmup: int, repeats: int, top: int) -> dict:
    """Measure one model (called in a fresh subprocess)."""
    import san_det  # noqa: F401  # isort: skip  (patches detectron2 0.6 before it is imported)

    import torch
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from san_det.config import get_san_det_cfg
    from san_det.layers.backend import select_backend

    torch.manual_seed(0)
    cfg = get_san_det_cfg()
    cfg.merge_from_file(str(_config_path(name)))
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    inputs = _inputs(batch, size, cfg.MODEL.RETINANET.NUM_CLASSES)

    def train_step():
        with EventStorage(0):
            losses = model(inputs)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{name}: non-finite loss {loss.item()}")

    model.train()
    for _ in range(warmup):
        train_step()
    rss_before = status_mb("VmRSS")
    peak_ok = reset_peak_rss()
    train_s, train_cpu_s = _median_time(train_step, repeats)
    peak_mb = status_mb("VmHWM") - rss_before if peak_ok else None

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        train_step()
    events = prof.key_averages()
    total_us = sum(e.self_cpu_time_total for e in events)
    # The ops' total time (their kernels and the small tensor operations they call; no san_det
    # op calls another, so nothing is counted twice) and the self time of their autograd nodes
    # (GeneratedBackwardFor_san_det_*, whose children are the backward ops counted already).
    attention_ops = [e for e in events if e.key.startswith(ATTENTION_OP_PREFIX)]
    attention_nodes = [e for e in events if e.key.startswith(ATTENTION_NODE_PREFIX)]
    attention_us = sum(e.cpu_time_total for e in attention_ops)
    attention_us += sum(e.self_cpu_time_total for e in attention_nodes)
    top_ops = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]

    model.eval()
    eval_inputs = [{k: x[k] for k in ("image", "height", "width")} for x in inputs]
    with torch.no_grad():
        model(eval_inputs)
        infer_s, infer_cpu_s = _median_time(lambda: model(eval_inputs), repeats)
    above = _time_above_bottom_up(model, inputs, train_step, eval_inputs, repeats)
    return {
        "model": name,
        "parameters": params,
        "train_step_s": train_s,
        "train_step_cpu_s": train_cpu_s,
        "load_average_1min": round(os.getloadavg()[0], 2),
        "inference_s": infer_s,
        "inference_cpu_s": infer_cpu_s,
        "train_peak_extra_mb": peak_mb,
        **above,
        "attention_backend": select_backend(torch.zeros(1)),
        "profile_total_self_cpu_s": total_us / 1e6,
        "profile_attention_share": attention_us / total_us if total_us else 0.0,
        "profile_attention_ops": {
            e.key: {"cpu_s": e.cpu_time_total / 1e6, "calls": e.count} for e in attention_ops
        },
        "profile_attention_autograd_nodes_self_s": {
            e.key: e.self_cpu_time_total / 1e6 for e in attention_nodes
        },
        "profile_top_ops": [
            {"op": e.key, "self_cpu_s": e.self_cpu_time_total / 1e6, "calls": e.count}
            for e in top_ops
        ],
    }


def _time_above_bottom_up(model, inputs, train_step, eval_inputs, repeats: int) -> dict:
    """CPU time of the train step and inference without the bottom-up network (FPN, head, losses,
    post-processing): its features, computed once, are fed in as leaves that take gradients."""
    import torch
    from detectron2.modeling import Backbone

    bottom_up = model.backbone.bottom_up
    with torch.no_grad():
        features = bottom_up(model.preprocess_image(inputs).tensor)

    class CachedBottomUp(Backbone):
        def forward(self, x):
            return {name: f.detach().requires_grad_(self.training) for name, f in features.items()}

        def output_shape(self):
            return bottom_up.output_shape()

    model.backbone.bottom_up = CachedBottomUp()
    try:
        model.train()
        train_step()
        _, train_cpu_s = _median_time(train_step, repeats)
        model.eval()
        with torch.no_grad():
            model(eval_inputs)
            _, infer_cpu_s = _median_time(lambda: model(eval_inputs), repeats)
    finally:
        model.backbone.bottom_up = bottom_up
    return {
        "above_bottom_up_train_cpu_s": train_cpu_s,
        "above_bottom_up_inference_cpu_s": infer_cpu_s,
    }


def _target_verdicts(results, base) -> list:
    """One line per target of :data:`TARGETS` whose model and R50 were both measured."""
    lines = []
    for r in results:
        for key, limit in TARGETS.get(r["model"], {}).items():
            if base is None or r is base or not r.get(key) or not base.get(key):
                continue
            ratio = r[key] / base[key]
            verdict = "met" if ratio <= limit else "missed"
            lines.append(f"target {r['model']} {key} <= {limit}x R50's: {ratio:.2f}x, {verdict}")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--top", type=int, default=12, help="profiled ops listed per model")
    parser.add_argument("--quick", action="store_true", help="batch 1, 128x128, 1 repeat, no JSON")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS + EXTRA_MODELS)
    parser.add_argument("--out", help="results file (default: by case, under benchmarks/results)")
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.size, args.warmup, args.repeats = 1, 128, 1, 1
    if args.out is None:
        case = "" if (args.batch, args.size) == DEFAULT_CASE else f"_{args.batch}x{args.size}"
        args.out = str(ROOT / "benchmarks" / "results" / f"retinanet_cpu{case}.json")
    if args._child:
        result = run_one(args._child, args.batch, args.size, args.warmup, args.repeats, args.top)
        print("RESULT " + json.dumps(result))
        return 0

    env = dict(os.environ)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))  # freed blocks go back to the OS
    results = []
    for name in args.models:
        cmd = [
            sys.executable, __file__, "--_child", name, "--batch", str(args.batch),
            "--size", str(args.size), "--warmup", str(args.warmup),
            "--repeats", str(args.repeats), "--top", str(args.top),
        ]  # fmt: skip
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            sys.stderr.write(proc.stderr[-4000:])
            raise RuntimeError(f"{name} failed (exit {proc.returncode})")
        results.append(json.loads(lines[-1][len("RESULT ") :]))
        r = results[-1]
        print(f"{name}: train {r['train_step_s']:.2f} s, inference {r['inference_s']:.2f} s")
        sys.stdout.flush()

    base = next((r for r in results if r["model"] == MODELS[0]), None)
    print()
    print(f"batch {args.batch} x {args.size}x{args.size}, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}, {cpu_name()}")  # fmt: skip
    print("| model | params (M) | train step s (CPU s) | vs R50 (CPU) | inference s (CPU s) | "
          "vs R50 (CPU) | train peak extra (MB) | vs R50 | attention ops share of train step | "
          "load |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")

    def vs_base(r, key):
        return f"{r[key] / base[key]:.2f}x" if base else "-"

    for r in results:
        ratio_t, ratio_c = vs_base(r, "train_step_s"), vs_base(r, "train_step_cpu_s")
        ratio_i, ratio_ic = vs_base(r, "inference_s"), vs_base(r, "inference_cpu_s")
        has_peak = r["train_peak_extra_mb"] is not None and base["train_peak_extra_mb"]
        peak = f"{r['train_peak_extra_mb']:.0f}" if r["train_peak_extra_mb"] is not None else "n/a"
        ratio_m = vs_base(r, "train_peak_extra_mb") if has_peak else "-"
        print(
            f"| {r['model']} | {r['parameters'] / 1e6:.2f} | {r['train_step_s']:.2f} "
            f"({r['train_step_cpu_s']:.2f}) | {ratio_t} ({ratio_c}) | "
            f"{r['inference_s']:.2f} ({r['inference_cpu_s']:.2f}) | {ratio_i} ({ratio_ic}) | "
            f"{peak} | {ratio_m} | {100 * r['profile_attention_share']:.0f}% | "
            f"{r['load_average_1min']} |"
        )
    verdicts = _target_verdicts(results, base)
    for line in verdicts:
        print(line)
    print("\nCPU s above the bottom-up network (FPN, head, losses, post-processing):")
    for r in results:
        print(f"  {r['model']}: train step {r['above_bottom_up_train_cpu_s']:.2f} "
              f"(vs R50 {vs_base(r, 'above_bottom_up_train_cpu_s')}), inference "
              f"{r['above_bottom_up_inference_cpu_s']:.2f} "
              f"(vs R50 {vs_base(r, 'above_bottom_up_inference_cpu_s')})")  # fmt: skip
    for r in results:
        print(f"\n{r['model']}: top ops by self CPU time in one profiled train step "
              f"({r['profile_total_self_cpu_s']:.2f} s)")  # fmt: skip
        for op in r["profile_top_ops"]:
            print(f"  {op['self_cpu_s']:7.3f} s  {op['calls']:5d} calls  {op['op']}")
    if not args.quick:
        meta = {
            "batch": args.batch,
            "size": args.size,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "cpu": cpu_name(),
            "load_average": os.getloadavg(),
            "torch": __import__("torch").__version__,
            "targets": verdicts,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        from san_det.utils.atomic import atomic_write

        with atomic_write(args.out, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
