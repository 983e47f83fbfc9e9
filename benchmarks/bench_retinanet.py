"""RetinaNet train-step and inference time and peak memory: R50, SASA-50, attention everywhere.

Models (configs/COCO-Detection): ``retinanet_R_50_FPN_1x`` (conv baseline), ``retinanet_sasa50``
(conv stem + attention backbone), ``retinanet_sasa50_full_attention`` (attention stem + attention
backbone, conv FPN and head) and ``retinanet_sasa50_attention_fpn_head`` (full-attention
backbone, attentional FPN and head), all with 80 classes, side by side in one run on the same
input (``--batch`` images of ``--size x --size`` with 3 boxes each, fixed seed). Two cases:
batch 2 at 256x256 (the default) and batch 1 at 640x640 (``--size 640 --batch 1``, COCO's
detection size); each ratio to R50 is printed beside the issue's targets for
``retinanet_sasa50_attention_fpn_head`` (:data:`TARGETS`, process CPU time).

Timing is interleaved: one long-lived worker process per model (:func:`serve`), all alive
together and driven round-robin by the parent (:func:`interleaved`): for each phase (train step,
inference, and the two "above the bottom-up network" cases) ``--warmup`` untimed rounds, then
``--repeats`` timed rounds, each calling every model once in turn. A drift of the machine's speed
(other jobs on a shared machine) then reaches every model alike: each ratio to R50 is taken
per round, from figures measured seconds apart, and the median of those ratios is reported
(``vs_base``; every round's figures and ratios are kept, ``*_rounds``, ``vs_base_rounds``).
Each figure is wall time with the worker's process CPU time beside it; the 1-minute load
average is read before every round (``meta.schedule``, with the order the models ran in). The
workers keep glibc's default allocator, as a training does (before the interleaving, the timing
ran with the memory measurement's fixed mmap threshold, which made every step slower).

- train step: forward with losses, backward and an SGD step (``model.train()``), median over the
  rounds of wall and process CPU time;
- inference: ``model.eval()`` forward under ``torch.no_grad`` (post-processing included);
- above the bottom-up network: the train step and inference without the bottom-up backbone (its
  features cached): what the FPN, the head, the losses and post-processing cost;
- peak memory: the process's peak resident set (``VmHWM``, reset via ``/proc/self/clear_refs``
  after ``--warmup`` steps) minus the resident set before ``--memory-repeats`` measured train
  steps, each model in a fresh process of its own, one after another, before the timing (so
  models do not share allocator state); includes allocator granularity. ``--memory-only``
  measures only this;
- profile: one training step under ``torch.profiler`` (after the timed rounds), the ops with the
  most self CPU time and the share of time inside san_det's attention ops (forward and backward).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_retinanet.py           # writes the JSON
    OMP_NUM_THREADS=1 python benchmarks/bench_retinanet.py --quick   # tiny smoke run, no JSON
    OMP_NUM_THREADS=1 python benchmarks/bench_retinanet.py --memory-only --memory-repeats 1 \\
        --models retinanet_R_50_FPN_1x retinanet_sasa50_attention_fpn_head
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
from typing import Optional

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
# What is timed, in this order, each phase in interleaved rounds: phase -> (wall, CPU) result keys.
PHASE_KEYS = {
    "train": ("train_step_s", "train_step_cpu_s"),
    "inference": ("inference_s", "inference_cpu_s"),
    "above_train": ("above_bottom_up_train_s", "above_bottom_up_train_cpu_s"),
    "above_inference": ("above_bottom_up_inference_s", "above_bottom_up_inference_cpu_s"),
}
PHASES = tuple(PHASE_KEYS)


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


class ModelBench:
    """One model, its SGD optimizer and its fixed input, with the measured calls of the benchmark.

    Built in a child process: :func:`serve` (timing, driven round-robin by the parent) or
    :func:`peak_memory` (a fresh process per model).
    """

    def __init__(self, name: str, batch: int, size: int):
        import san_det  # noqa: F401  # isort: skip  (patches detectron2 0.6 before it is imported)

        import torch
        from detectron2.modeling import build_model

        from san_det.config import get_san_det_cfg

        torch.manual_seed(0)
        cfg = get_san_det_cfg()
        cfg.merge_from_file(str(_config_path(name)))
        cfg.MODEL.DEVICE = "cpu"
        self.name = name
        self.model = build_model(cfg)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-4, momentum=0.9)
        self.inputs = _inputs(batch, size, cfg.MODEL.RETINANET.NUM_CLASSES)
        self.eval_inputs = [{k: x[k] for k in ("image", "height", "width")} for x in self.inputs]
        self._features = None  # the bottom-up network's features, for the "above" calls

    def describe(self) -> dict:
        import torch

        from san_det.layers.backend import select_backend

        return {
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "attention_backend": select_backend(torch.zeros(1)),
        }

    def train_step(self) -> None:
        """Forward with losses, backward and an SGD step (``model.train()``)."""
        import torch
        from detectron2.utils.events import EventStorage

        self.model.train()
        with EventStorage(0):
            losses = self.model(self.inputs)
        loss = sum(losses.values())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{self.name}: non-finite loss {loss.item()}")

    def inference(self) -> None:
        """``model.eval()`` forward under ``torch.no_grad`` (post-processing included)."""
        import torch

        self.model.eval()
        with torch.no_grad():
            self.model(self.eval_inputs)

    def above_bottom_up(self, call) -> None:
        """``call()`` (:meth:`train_step` or :meth:`inference`) with the bottom-up network
        replaced by its features, computed once and fed in as leaves that take gradients: what
        the FPN, the head, the losses and post-processing cost."""
        import torch
        from detectron2.modeling import Backbone

        backbone = self.model.backbone
        bottom_up = backbone.bottom_up
        if self._features is None:
            self.model.eval()
            with torch.no_grad():
                self._features = bottom_up(self.model.preprocess_image(self.inputs).tensor)
        features = self._features

        class CachedBottomUp(Backbone):
            def forward(self, x):
                return {k: f.detach().requires_grad_(self.training) for k, f in features.items()}

            def output_shape(self):
                return bottom_up.output_shape()

        backbone.bottom_up = CachedBottomUp()
        try:
            call()
        finally:
            backbone.bottom_up = bottom_up

    def timed(self, phase: str) -> dict:
        """Wall and process CPU seconds of one call of ``phase`` (one of :data:`PHASES`), and
        when it started (``time.time()``)."""
        call = {
            "train": self.train_step,
            "inference": self.inference,
            "above_train": lambda: self.above_bottom_up(self.train_step),
            "above_inference": lambda: self.above_bottom_up(self.inference),
        }[phase]
        started_at = time.time()  # the machine's clock: comparable across the workers
        start, start_cpu = time.perf_counter(), time.process_time()
        call()
        wall_s, cpu_s = time.perf_counter() - start, time.process_time() - start_cpu
        return {"wall_s": wall_s, "cpu_s": cpu_s, "started_at": started_at}

    def profile(self, top: int) -> dict:
        """One training step under ``torch.profiler``: the ops with the most self CPU time and the
        share of time inside san_det's attention ops (forward and backward)."""
        import torch

        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            self.train_step()
        events = prof.key_averages()
        total_us = sum(e.self_cpu_time_total for e in events)
        # The ops' total time (their kernels and the small tensor operations they call; no
        # san_det op calls another, so nothing is counted twice) and the self time of their
        # autograd nodes (GeneratedBackwardFor_san_det_*, whose children are the backward ops
        # counted already).
        attention_ops = [e for e in events if e.key.startswith(ATTENTION_OP_PREFIX)]
        attention_nodes = [e for e in events if e.key.startswith(ATTENTION_NODE_PREFIX)]
        attention_us = sum(e.cpu_time_total for e in attention_ops)
        attention_us += sum(e.self_cpu_time_total for e in attention_nodes)
        top_ops = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
        return {
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


def serve(name: str, batch: int, size: int, top: int, stdin=None, stdout=None) -> None:
    """A timing worker (one model, in its own long-lived process): builds the model, answers
    ``READY {...}``, then runs one command per line of ``stdin`` (a phase of :data:`PHASES`,
    ``profile`` or ``quit``) and answers each with ``RESULT {json}`` on ``stdout``."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    bench = ModelBench(name, batch, size)

    def reply(tag: str, payload: dict) -> None:
        stdout.write(f"{tag} {json.dumps(payload)}\n")
        stdout.flush()

    reply("READY", bench.describe())
    for line in stdin:
        command = line.strip()
        if command == "quit":
            break
        reply("RESULT", bench.profile(top) if command == "profile" else bench.timed(command))


def peak_memory(name: str, batch: int, size: int, warmup: int, repeats: int) -> dict:
    """Peak extra resident set of ``repeats`` train steps after ``warmup`` (call in a fresh
    process: the peak is ``VmHWM``, reset after the warm-up, minus the resident set then)."""
    bench = ModelBench(name, batch, size)
    for _ in range(warmup):
        bench.train_step()
    rss_before = status_mb("VmRSS")
    peak_ok = reset_peak_rss()
    for _ in range(repeats):
        bench.train_step()
    return {"train_peak_extra_mb": status_mb("VmHWM") - rss_before if peak_ok else None}


class Worker:
    """The parent's handle on a :func:`serve` child: ``call(command)`` -> its JSON answer."""

    def __init__(self, name: str, args, env: dict, log_dir: str):
        self.name = name
        self.log_path = Path(log_dir) / f"{name.replace('/', '_')}.stderr"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            _child_command(args, "--_worker", name),
            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
        )  # fmt: skip

    def _answer(self, tag: str) -> dict:
        for line in self.proc.stdout:
            if line.startswith(tag + " "):
                return json.loads(line[len(tag) + 1 :])
        self.proc.wait()
        self._log.flush()
        tail = self.log_path.read_text()[-4000:]
        raise RuntimeError(f"{self.name} failed (exit {self.proc.returncode}):\n{tail}")

    def ready(self) -> dict:
        return self._answer("READY")

    def call(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._answer("RESULT")

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        self._log.close()


def interleaved(workers: dict, phases, warmup: int, repeats: int, on_round=None) -> dict:
    """Time every phase of every model, alternating the models call by call.

    For each phase, ``warmup`` untimed rounds and then ``repeats`` timed rounds; a round calls
    every worker once, in the order of ``workers`` (``name -> object with call(phase)``), so a
    drift of the machine's speed reaches all models alike. ``on_round(phase, round, order)`` is
    called before each timed round (the load average is read there).

    Returns ``{phase: {name: [answer of each timed round]}}``.
    """
    timings = {phase: {name: [] for name in workers} for phase in phases}
    for phase in phases:
        for _ in range(warmup):
            for worker in workers.values():
                worker.call(phase)
        for index in range(repeats):
            if on_round is not None:
                on_round(phase, index, list(workers))
            for name, worker in workers.items():
                timings[phase][name].append(worker.call(phase))
    return timings


def summarize(timings: dict, base: Optional[str]) -> dict:
    """Per model: the median wall and CPU time of each phase (the result keys of
    :data:`PHASE_KEYS`), every round's figures (``<key>_rounds``) and, where ``base`` (R50) was
    measured, the ratio to it in each round (``vs_base_rounds``) and their median (``vs_base``).
    """
    out = {}
    for phase, per_model in timings.items():
        wall_key, cpu_key = PHASE_KEYS[phase]
        for name, answers in per_model.items():
            row = out.setdefault(name, {"vs_base": {}, "vs_base_rounds": {}})
            for key, field in ((wall_key, "wall_s"), (cpu_key, "cpu_s")):
                values = [a[field] for a in answers]
                row[key] = statistics.median(values)
                row[key + "_rounds"] = values
                if base is not None and base in per_model:
                    ratios = [v / b[field] for v, b in zip(values, per_model[base])]
                    row["vs_base_rounds"][key] = ratios
                    row["vs_base"][key] = statistics.median(ratios)
    return out


def _child_command(args, mode: str, name: str) -> list:
    return [
        sys.executable, __file__, mode, name, "--batch", str(args.batch),
        "--size", str(args.size), "--warmup", str(args.warmup),
        "--repeats", str(args.memory_repeats or args.repeats), "--top", str(args.top),
    ]  # fmt: skip


def _target_verdicts(results, base) -> list:
    """One line per target of :data:`TARGETS` whose model and R50 were both measured: the median
    of the per-round ratios for times, the ratio of the two peaks for memory."""
    lines = []
    for r in results:
        for key, limit in TARGETS.get(r["model"], {}).items():
            if base is None or r is base or not r.get(key) or not base.get(key):
                continue
            ratio = r.get("vs_base", {}).get(key, r[key] / base[key])
            verdict = "met" if ratio <= limit else "missed"
            lines.append(f"target {r['model']} {key} <= {limit}x R50's: {ratio:.2f}x, {verdict}")
    return lines


def _measure_memory(args, env: dict) -> dict:
    """``name -> train_peak_extra_mb``, each model in a fresh process, one after another."""
    peaks = {}
    for name in args.models:
        proc = subprocess.run(
            _child_command(args, "--_memory", name), env=env, capture_output=True, text=True
        )
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            sys.stderr.write(proc.stderr[-4000:])
            raise RuntimeError(f"{name} failed (exit {proc.returncode})")
        peaks[name] = json.loads(lines[-1][len("RESULT ") :])["train_peak_extra_mb"]
        print(f"{name}: train peak extra {_mb(peaks[name])} MB", flush=True)
    return peaks


def _mb(value) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def _measure_times(args, env: dict, schedule: list) -> dict:
    """The interleaved timing of :func:`interleaved` over one :func:`serve` worker per model,
    then one profiled step per model: ``name -> result fields``."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bench_retinanet_") as log_dir:
        workers = {}
        try:
            for name in args.models:  # all start together, then wait for each model's build
                workers[name] = Worker(name, args, env, log_dir)
            described = {name: worker.ready() for name, worker in workers.items()}

            def on_round(phase, index, order):
                schedule.append({"phase": phase, "round": index, "order": order,
                                 "load_average_1min": round(os.getloadavg()[0], 2)})  # fmt: skip
                print(f"{phase} round {index + 1}/{args.repeats} "
                      f"(load {schedule[-1]['load_average_1min']})", flush=True)  # fmt: skip

            timings = interleaved(workers, PHASES, args.warmup, args.repeats, on_round)
            for entry in schedule:  # when each model's call started, as the workers saw it
                calls = timings[entry["phase"]]
                started = [calls[name][entry["round"]]["started_at"] for name in entry["order"]]
                entry["started_at"] = started
            profiles = {name: worker.call("profile") for name, worker in workers.items()}
        finally:
            for worker in workers.values():
                worker.close()
    base = MODELS[0] if MODELS[0] in workers else None
    times = summarize(timings, base)
    train_loads = [r["load_average_1min"] for r in schedule if r["phase"] == "train"]
    return {
        name: {
            **described[name],
            **times[name],
            "load_average_1min": round(statistics.median(train_loads), 2),
            **profiles[name],
        }
        for name in workers
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds (steps) first")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds")
    parser.add_argument("--memory-repeats", type=int, default=None,
                        help="train steps of the peak-memory run (default: --repeats)")  # fmt: skip
    parser.add_argument("--memory-only", action="store_true",
                        help="measure only the peak memory (no timing, no JSON)")  # fmt: skip
    parser.add_argument("--top", type=int, default=12, help="profiled ops listed per model")
    parser.add_argument("--quick", action="store_true",
                        help="batch 1, 128x128, 1 round, no JSON unless --out")  # fmt: skip
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS + EXTRA_MODELS)
    parser.add_argument("--out", help="results file (default: by case, under benchmarks/results)")
    parser.add_argument("--_worker", help=argparse.SUPPRESS)
    parser.add_argument("--_memory", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    write = not args.memory_only and (not args.quick or args.out is not None)
    if args.quick:
        args.batch, args.size, args.warmup, args.repeats = 1, 128, 1, 1
    if args.out is None:
        case = "" if (args.batch, args.size) == DEFAULT_CASE else f"_{args.batch}x{args.size}"
        args.out = str(ROOT / "benchmarks" / "results" / f"retinanet_cpu{case}.json")
    if args._worker:
        serve(args._worker, args.batch, args.size, args.top)
        return 0
    if args._memory:
        result = peak_memory(args._memory, args.batch, args.size, args.warmup, args.repeats)
        print("RESULT " + json.dumps(result))
        return 0

    # Memory children: glibc's mmap threshold fixed, so freed blocks go back to the OS (the peak
    # resident set is the peak of live memory). Timing workers keep the default allocator, as a
    # training does (with the fixed threshold every large allocation faults its pages in again:
    # at batch 2 256x256 R50's step took 2.46 CPU s instead of 1.69 and
    # retinanet_sasa50_attention_fpn_head's 1.20x R50's instead of 1.30x).
    memory_env = dict(os.environ)
    memory_env.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
    load_start = os.getloadavg()
    peaks = _measure_memory(args, memory_env)
    header = (f"batch {args.batch} x {args.size}x{args.size}, OMP_NUM_THREADS="
              f"{os.environ.get('OMP_NUM_THREADS', 'unset')}, {cpu_name()}")  # fmt: skip
    if args.memory_only:
        base_peak = peaks.get(MODELS[0])
        print(f"\n{header}, load average {os.getloadavg()[0]:.2f}")
        for name, peak in peaks.items():
            ratio = f"{peak / base_peak:.2f}x R50" if base_peak and peak is not None else "-"
            print(f"  {name}: train peak extra {_mb(peak)} MB ({ratio})")
        return 0
    schedule = []
    measured = _measure_times(args, dict(os.environ), schedule)
    results = [
        {"model": name, **measured[name], "train_peak_extra_mb": peaks[name]}
        for name in args.models
    ]
    base = next((r for r in results if r["model"] == MODELS[0]), None)
    if base is not None and base["train_peak_extra_mb"]:
        for r in results:
            if r["train_peak_extra_mb"] is not None:
                ratio = r["train_peak_extra_mb"] / base["train_peak_extra_mb"]
                r["vs_base"]["train_peak_extra_mb"] = ratio
    print()
    print(header)
    print("| model | params (M) | train step s (CPU s) | vs R50 (CPU) | inference s (CPU s) | "
          "vs R50 (CPU) | train peak extra (MB) | vs R50 | attention ops share of train step | "
          "load |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")

    def vs_base(r, key):
        ratio = r["vs_base"].get(key)
        return "-" if ratio is None else f"{ratio:.2f}x"

    for r in results:
        ratio_t, ratio_c = vs_base(r, "train_step_s"), vs_base(r, "train_step_cpu_s")
        ratio_i, ratio_ic = vs_base(r, "inference_s"), vs_base(r, "inference_cpu_s")
        print(
            f"| {r['model']} | {r['parameters'] / 1e6:.2f} | {r['train_step_s']:.2f} "
            f"({r['train_step_cpu_s']:.2f}) | {ratio_t} ({ratio_c}) | "
            f"{r['inference_s']:.2f} ({r['inference_cpu_s']:.2f}) | {ratio_i} ({ratio_ic}) | "
            f"{_mb(r['train_peak_extra_mb'])} | {vs_base(r, 'train_peak_extra_mb')} | "
            f"{100 * r['profile_attention_share']:.0f}% | {r['load_average_1min']} |"
        )
    print("(times: medians of the rounds; ratios: medians of the per-round ratios)")
    verdicts = _target_verdicts(results, base)
    for line in verdicts:
        print(line)
    if base is not None:
        print("\nper-round train step CPU-time ratios to R50:")
        for r in results:
            rounds = ", ".join(f"{x:.2f}" for x in r["vs_base_rounds"]["train_step_cpu_s"])
            print(f"  {r['model']}: {rounds}")
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
    if write:
        meta = {
            "batch": args.batch,
            "size": args.size,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "memory_repeats": args.memory_repeats or args.repeats,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "cpu": cpu_name(),
            "load_average": os.getloadavg(),
            "load_average_start": load_start,
            "torch": __import__("torch").__version__,
            "timing": "interleaved: one worker process per model, every round calls each once",
            "timing_malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
            "schedule": schedule,
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
