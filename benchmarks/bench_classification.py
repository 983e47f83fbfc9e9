"""Classification throughput (images/s) of ImageNet configs: training step and inference.

For each config: the classifier it builds (``ImageClassifier``), a batch of random uint8 images of
the config's crop size, then the median over ``--iters`` timed repetitions (after ``--warmup``) of

- ``train``: forward + backward + SGD step (momentum, as the recipe), model in training mode;
- ``infer``: forward under ``torch.no_grad`` in eval mode.

With ``--amp`` (GPU only) both run under ``torch.autocast(float16)`` with a ``GradScaler``, as
detectron2's ``AMPTrainer``. Data loading is not included (the model's own throughput).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_classification.py            # the CPU demo config
    python benchmarks/bench_classification.py --device cuda --amp --batch 64 \\
        --configs configs/ImageNet/sasa26.yaml configs/ImageNet/san10_pairwise.yaml

Results: JSON to ``--out`` (default ``benchmarks/results/classification_<device>.json``) and a
Markdown table to stdout.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import san_det  # noqa: E402,F401  (before detectron2)
import torch  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

from san_det.config import get_san_det_cfg  # noqa: E402


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _time(fn, device, warmup, iters):
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(config, device, batch, amp, warmup, iters, opts):
    cfg = get_san_det_cfg(config, ["MODEL.DEVICE", device] + list(opts))
    size = cfg.CLASSIFICATION.INPUT.TRAIN_CROP_SIZE
    torch.manual_seed(0)
    model = build_model(cfg)
    images = [
        {"image": torch.randint(0, 256, (3, size, size), dtype=torch.uint8), "label": i % 10}
        for i in range(batch)
    ]
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)

    def train_step():
        with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
            loss = model(images)["loss_cls"]
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{config}: non-finite loss {float(loss)}")

    def infer_step():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16, enabled=amp):
            model(images)

    model.train()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_train = _time(train_step, device, warmup, iters)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    model.eval()
    t_infer = _time(infer_step, device, warmup, iters)
    return {
        "config": os.path.relpath(config, ROOT),
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
        "input": size,
        "batch": batch,
        "amp": amp,
        "train_s_per_iter": round(t_train, 5),
        "train_images_per_s": round(batch / t_train, 1),
        "infer_images_per_s": round(batch / t_infer, 1),
        "train_peak_mib": None if peak is None else round(peak, 1),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--configs", nargs="+", default=[str(ROOT / "configs/ImageNet/embedded_cpu_demo.yaml")]
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--amp", action="store_true", help="float16 autocast (GPU only)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--out", default="")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    if args.amp and args.device != "cuda":
        parser.error("--amp needs --device cuda")
    rows = [
        bench(c, args.device, args.batch, args.amp, args.warmup, args.iters, args.opts)
        for c in args.configs
    ]
    env = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor(),
        "torch": torch.__version__,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "default"),
        "torch_threads": torch.get_num_threads(),
    }
    if hasattr(os, "getloadavg"):
        env["load_average_1min"] = round(os.getloadavg()[0], 2)
    out = args.out or str(ROOT / "benchmarks" / "results" / f"classification_{args.device}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"env": env, "results": rows}, f, indent=1)
    print(f"{env}\n")
    print("| config | params (M) | input | batch | AMP | train img/s | infer img/s | peak MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['config']} | {r['params_m']} | {r['input']} | {r['batch']} | {r['amp']} | "
            f"{r['train_images_per_s']} | {r['infer_images_per_s']} | {r['train_peak_mib']} |"
        )


if __name__ == "__main__":
    main()
