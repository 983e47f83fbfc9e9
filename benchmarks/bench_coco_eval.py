"""COCO box evaluation time: pycocotools vs faster-coco-eval through detectron2's COCOEvaluator.

The set is generated (:func:`tests.helpers.synthetic_coco.synthetic_coco_detections`, default
5,000 images x 100 detections, about 30,000 ground-truth boxes in 5 classes). Both backends
evaluate the same predictions, already passed through ``COCOEvaluator.process``, side by side in
one process, alternating for ``--repeats`` rounds:

- ``pycocotools``: ``COCOEvaluator(use_fast_impl=False)`` (the official implementation);
- ``faster-coco-eval``: ``COCOEvaluator(use_fast_impl=True)``, whose ``COCOeval_opt`` is
  faster-coco-eval's ``COCOeval_faster`` when detectron2 has no ``_C`` (``san_det.compat``).

Timed: ``evaluator.evaluate()`` (loadRes, evaluate, accumulate, summarize, per-class AP). Checked:
the 12 summary numbers and the per-class APs of the two (largest absolute difference).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_coco_eval.py            # writes the JSON
    OMP_NUM_THREADS=1 python benchmarks/bench_coco_eval.py --quick    # 200 images, no JSON

Writes ``benchmarks/results/coco_eval_cpu.json`` and prints a Markdown table.
"""

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import cpu_name  # noqa: E402

BACKENDS = {"pycocotools": False, "faster-coco-eval": True}  # name -> use_fast_impl


def _register(folder: str, ground_truth) -> str:
    from detectron2.data import DatasetCatalog
    from detectron2.data.datasets import register_coco_instances

    name = "bench_coco_eval"
    path = os.path.join(folder, "ground_truth.json")
    with open(path, "w") as f:
        json.dump(ground_truth, f)
    register_coco_instances(name, {}, path, folder)
    DatasetCatalog.get(name)  # sets the category id mapping
    return name


def _processed(name: str, results, use_fast_impl: bool):
    """A COCOEvaluator holding ``results`` as the model's outputs, per image."""
    from detectron2.evaluation import COCOEvaluator

    from tests.helpers.synthetic_coco import process_coco_results

    evaluator = COCOEvaluator(name, tasks=("bbox",), distributed=False, use_fast_impl=use_fast_impl)
    evaluator.reset()
    process_coco_results(evaluator, name, results)
    return evaluator


def _evaluate(evaluator):
    """(seconds, detectron2's bbox results, the 12 COCO stats)."""
    from detectron2.evaluation import coco_evaluation

    stats = {}
    derive = coco_evaluation.COCOEvaluator._derive_coco_results

    def recording(self, coco_eval, iou_type, class_names=None):
        stats["stats"] = [float(x) for x in coco_eval.stats]
        return derive(self, coco_eval, iou_type, class_names)

    evaluator._derive_coco_results = recording.__get__(evaluator)
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        results = evaluator.evaluate()["bbox"]
    return time.perf_counter() - start, results, stats["stats"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--detections", type=int, default=100, help="per image")
    parser.add_argument("--repeats", type=int, default=2, help="rounds, backends alternating")
    parser.add_argument("--quick", action="store_true", help="200 images, 1 round, no JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.repeats = 200, 1

    import san_det  # noqa: F401  (patches detectron2 0.6)
    from san_det import compat
    from tests.helpers.synthetic_coco import synthetic_coco_detections

    if compat.coco_eval_backend() != "faster-coco-eval":
        print(
            f"COCOeval_opt runs on {compat.coco_eval_backend()}, not faster-coco-eval",
            file=sys.stderr,
        )
        return 2
    ground_truth, results = synthetic_coco_detections(args.images, args.detections)
    load = {"before": [round(x, 2) for x in os.getloadavg()]}
    times = {name: [] for name in BACKENDS}
    outputs = {}
    with tempfile.TemporaryDirectory() as folder:
        name = _register(folder, ground_truth)
        for _ in range(args.repeats):
            for backend, fast in BACKENDS.items():
                seconds, metrics, stats = _evaluate(_processed(name, results, fast))
                times[backend].append(seconds)
                outputs[backend] = (metrics, stats)
                print(f"{backend}: {seconds:.1f} s (load average {os.getloadavg()[0]:.2f})")
    load["after"] = [round(x, 2) for x in os.getloadavg()]
    (ref_metrics, ref_stats), (fast_metrics, fast_stats) = outputs.values()
    per_class = [k for k in ref_metrics if k.startswith("AP-")]
    report = {
        "images": args.images,
        "detections_per_image": args.detections,
        "ground_truth_boxes": len(ground_truth["annotations"]),
        "repeats": args.repeats,
        "seconds": times,
        "median_seconds": {k: statistics.median(v) for k, v in times.items()},
        "speedup": statistics.median(times["pycocotools"])
        / statistics.median(times["faster-coco-eval"]),
        "stats_pycocotools": ref_stats,
        "max_abs_diff_12_stats": max(abs(a - b) for a, b in zip(ref_stats, fast_stats)),
        # detectron2 reports APs in percent
        "max_abs_diff_per_class_ap_percent": max(
            abs(ref_metrics[k] - fast_metrics[k]) for k in per_class
        ),
        "per_class_ap_pycocotools": {k: ref_metrics[k] for k in per_class},
        "load_average_1_5_15": load,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "cpu": cpu_name(),
        "versions": {
            p: version(p)
            for p in ("pycocotools", "faster-coco-eval", "pb1-detectron2")
            if _installed(p)
        },
    }
    median = report["median_seconds"]
    print(
        f"\n| backend | seconds (median of {args.repeats}) | speedup |\n|---|---|---|\n"
        f"| pycocotools | {median['pycocotools']:.1f} | 1.0x |\n"
        f"| faster-coco-eval | {median['faster-coco-eval']:.1f} | {report['speedup']:.1f}x |\n\n"
        f"{args.images} images x {args.detections} detections, "
        f"{report['ground_truth_boxes']} ground-truth boxes; 12 stats differ by at most "
        f"{report['max_abs_diff_12_stats']:.1e}, per-class AP (percent) by at most "
        f"{report['max_abs_diff_per_class_ap_percent']:.1e}; "
        f"OMP_NUM_THREADS={report['OMP_NUM_THREADS']}, load average {load['before']} -> "
        f"{load['after']}, {report['cpu']}"
    )
    if not args.quick:
        out = ROOT / "benchmarks" / "results" / "coco_eval_cpu.json"
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out}")
    return 0


def _installed(distribution: str) -> bool:
    try:
        version(distribution)
        return True
    except PackageNotFoundError:
        return False


if __name__ == "__main__":
    sys.exit(main())
