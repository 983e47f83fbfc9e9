"""What train_net.py's dataset check costs: a generated COCO set of 10,000 JPEG images.

The set: ``--images`` 640x480 JPEGs (a flat background with a few rectangles, about 10 KB each;
every 10th rotated by its EXIF orientation, its json size swapped to match) and a json with 1 to 5
boxes per image. Timed, wall and process CPU time, in one process:

- ``first run``: :func:`san_det.data.coco_checks.find_coco_problems` with an empty cache (the
  json's format check, every image's header read, the result written to the cache);
- ``cached run``: the same call again (the cache file read back);
- ``full decode``: detectron2's ``read_image`` of ``--decode-sample`` of the images, scaled to the
  whole set: what a check that decoded every image would cost (for comparison).

The image files are in the OS page cache (just written): a first run on a cold disk adds the
disk's reading time of one header per image.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_dataset_check.py           # writes the JSON
    OMP_NUM_THREADS=1 python benchmarks/bench_dataset_check.py --quick   # 500 images, no JSON

Writes ``benchmarks/results/dataset_check_cpu.json`` and prints the figures.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import cpu_name, write_report  # noqa: E402


def write_dataset(folder: str, num_images: int, seed: int = 0) -> str:
    """The generated set of the module docstring; returns the json's path."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for i in range(num_images):
        pixels = np.full((480, 640, 3), rng.integers(0, 256, 3), np.uint8)
        boxes = []
        for _ in range(int(rng.integers(1, 6))):
            x, y = int(rng.integers(0, 560)), int(rng.integers(0, 400))
            w, h = int(rng.integers(10, 80)), int(rng.integers(10, 80))
            pixels[y : y + h, x : x + w] = rng.integers(0, 256, 3)
            boxes.append([x, y, w, h])
        name = f"{i:06d}.jpg"
        image = Image.fromarray(pixels)
        width, height = 640, 480
        if i % 10 == 0:  # stored landscape, shown portrait
            exif = Image.Exif()
            exif[0x0112] = 6
            image.save(os.path.join(folder, name), quality=90, exif=exif.tobytes())
            width, height = height, width
        else:
            image.save(os.path.join(folder, name), quality=90)
        images.append({"id": i + 1, "file_name": name, "width": width, "height": height})
        for box in boxes:
            annotations.append(
                {"id": len(annotations) + 1, "image_id": i + 1, "category_id": 1 + len(boxes) % 3,
                 "bbox": box, "area": box[2] * box[3], "iscrowd": 0}
            )  # fmt: skip
    categories = [{"id": k, "name": f"class{k}"} for k in (1, 2, 3)]
    path = os.path.join(folder, "instances.json")
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return path


def timed(fn):
    start, start_cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - start, time.process_time() - start_cpu


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--decode-sample", type=int, default=1000, help="images fully decoded")
    parser.add_argument("--quick", action="store_true", help="500 images, no JSON")
    args = parser.parse_args()
    if args.quick:
        args.images, args.decode_sample = 500, 100

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["SAN_DET_CACHE"] = os.path.join(tmp, "cache")
        from detectron2.data.detection_utils import read_image

        from san_det.data.coco_checks import find_coco_problems

        image_root = os.path.join(tmp, "images")
        os.makedirs(image_root)
        json_file, gen_s, _ = timed(lambda: write_dataset(image_root, args.images))
        data_mb = sum(e.stat().st_size for e in os.scandir(image_root)) / 2**20
        print(f"generated {args.images} images ({data_mb:.0f} MiB) in {gen_s:.0f} s")
        load = {"before": [round(x, 2) for x in os.getloadavg()]}
        first, first_s, first_cpu = timed(lambda: find_coco_problems(json_file, image_root))
        assert first.problems == [] and first.num_images == args.images, first.problems[:3]
        again, cached_s, cached_cpu = timed(lambda: find_coco_problems(json_file, image_root))
        assert again == first
        sample = sorted(os.listdir(image_root))[: args.decode_sample]
        _, decode_s, decode_cpu = timed(
            lambda: [read_image(os.path.join(image_root, n), "BGR") for n in sample if ".jpg" in n]
        )
        load["after"] = [round(x, 2) for x in os.getloadavg()]
    scale = args.images / max(1, len([n for n in sample if ".jpg" in n]))
    report = {
        "benchmark": "dataset_check",
        "cpu": cpu_name(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "images": args.images,
        "image_size": "640x480 JPEG",
        "data_mib": round(data_mb, 1),
        "first_run_s": {"wall": round(first_s, 2), "cpu": round(first_cpu, 2)},
        "cached_run_s": {"wall": round(cached_s, 4), "cpu": round(cached_cpu, 4)},
        "full_decode_s_scaled": {
            "wall": round(decode_s * scale, 1),
            "cpu": round(decode_cpu * scale, 1),
            "sample": len(sample),
        },
        "per_image_ms_first_run": round(first_s / args.images * 1e3, 3),
        "load_average_1_5_15": load,
        "command": "OMP_NUM_THREADS=1 python benchmarks/bench_dataset_check.py",
    }
    print(json.dumps(report, indent=2))
    if not args.quick:
        write_report(report, ROOT / "benchmarks/results/dataset_check_cpu.json")


if __name__ == "__main__":
    main()
