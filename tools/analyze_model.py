#!/usr/bin/env python
"""Parameters, FLOPs, activations and structure of any san_det config, on the CPU, no dataset.

Like detectron2's ``tools/analyze_model.py``, but the input is a dummy image of a chosen size
(no dataset needed) and the FLOP counter counts san_det's attention ops (local attention, SAN
aggregation) instead of skipping them (see :mod:`san_det.modeling.flop_handles`).

FLOPs are multiply-adds, as fvcore and SAN's tables count them (SASA's tables count a
multiply-add as 2 FLOPs: the tool prints both); batch norm is included as fvcore counts it.

Examples::

    # the paper's ImageNet figures (SAN MACs; SASA FLOPS = 2 x MACs) at 224x224
    python tools/analyze_model.py --config-file configs/ImageNet/sasa50.yaml --tasks parameter flop
    # a detector at 640x640 (SASA's COCO crop size)
    python tools/analyze_model.py --config-file configs/COCO-Detection/retinanet_sasa50.yaml \
        --tasks parameter flop --input-size 640 640
"""

import argparse
import logging
import sys
from collections import Counter
from typing import Any, Dict, Iterator, List

import san_det  # noqa: F401  (patches detectron2 before it is imported)

import torch  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402
from torch import nn  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from fvcore.nn import ActivationCountAnalysis, flop_count_table, parameter_count  # noqa: E402
from fvcore.nn import parameter_count_table  # noqa: E402
from fvcore.nn.jit_handles import get_shape  # noqa: E402

from san_det.classification import is_classification_config  # noqa: E402
from san_det.config import setup_cfg  # noqa: E402
from san_det.engine import UserInputError  # noqa: E402
from san_det.engine.validate import build_model_on_meta  # noqa: E402
from san_det.modeling.flop_handles import ATTENTION_OP_HANDLES  # noqa: E402
from san_det.modeling.flop_handles import SanDetFlopCountAnalysis  # noqa: E402

logger = logging.getLogger("san_det.analyze_model")

TASKS = ("parameter", "flop", "activation", "structure")
# Elementwise, reduction and post-processing ops that count no multiply-adds (detectron2's list,
# batch norm excepted: fvcore counts it, and so do the numbers in docs/MODELS.md).
IGNORED_OPS = (
    "aten::add", "aten::add_", "aten::argmax", "aten::argsort", "aten::constant_pad_nd",
    "aten::div", "aten::div_", "aten::exp", "aten::log2", "aten::max_pool2d", "aten::meshgrid",
    "aten::mul", "aten::mul_", "aten::neg", "aten::nonzero_numpy", "aten::reciprocal",
    "aten::rsub", "aten::sigmoid", "aten::sigmoid_", "aten::softmax", "aten::sort", "aten::sqrt",
    "aten::sub", "torchvision::nms", "aten::avg_pool2d", "aten::linspace", "aten::pad",
    "aten::im2col", "aten::sum", "aten::mean", "aten::topk", "aten::relu", "aten::relu_",
    "aten::masked_fill", "aten::upsample_nearest2d", "aten::repeat",
)  # fmt: skip


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config-file", required=True, metavar="FILE", help="config to analyze")
    parser.add_argument(
        "--tasks", nargs="+", choices=TASKS, default=["parameter", "flop"], help="what to report"
    )
    parser.add_argument(
        "--input-size",
        nargs=2,
        type=int,
        metavar=("H", "W"),
        help="dummy image size (default: 224 224 for classifiers, 640 640 for detectors)",
    )
    parser.add_argument("--max-depth", type=int, default=3, help="depth of the per-module tables")
    parser.add_argument(
        "opts", default=[], nargs=argparse.REMAINDER, help="config overrides: KEY VALUE pairs"
    )
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = argument_parser()
    args = parser.parse_args(argv)
    if args.input_size and min(args.input_size) < 1:
        parser.error(f"--input-size must be positive, got {args.input_size}")
    return args


def config_from_args(args):
    """The config (on the CPU without a GPU): :func:`san_det.config.setup_cfg`'s checks, and
    a model its constructors accept.

    Raises:
        UserInputError: a missing config file, unknown key, or a model config its constructors
            refuse (one line, naming the key).
    """
    device = [] if torch.cuda.is_available() else ["MODEL.DEVICE", "cpu"]
    cfg = setup_cfg(args.config_file, list(args.opts) + device, check_output=False)
    build_model_on_meta(cfg)
    return cfg


def dummy_inputs(cfg, size) -> List[Dict[str, Any]]:
    # the task as train_net.py tells it (its trainer_class)
    h, w = size or ((224, 224) if is_classification_config(cfg) else (640, 640))
    image = torch.rand(3, h, w, generator=torch.Generator().manual_seed(0)) * 255
    return [{"image": image.to(cfg.MODEL.DEVICE), "height": h, "width": w}]


def _tensors(value) -> Iterator[torch.Tensor]:
    """Every tensor inside a model output (dicts, lists, Instances, Boxes), in a fixed order."""
    if torch.is_tensor(value):
        yield value
    elif isinstance(value, Boxes):
        yield value.tensor
    elif isinstance(value, Instances):
        for key in sorted(value.get_fields()):
            yield from _tensors(value.get(key))
    elif isinstance(value, dict):
        for key in sorted(value):
            yield from _tensors(value[key])
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


class ImageToTensors(nn.Module):
    """Traceable view of a detectron2 model: one image tensor in, a tuple of tensors out.

    (detectron2's ``TracingAdapter`` does this too, but ``detectron2.export`` imports caffe2.)
    """

    def __init__(self, model: nn.Module, height: int, width: int):
        super().__init__()
        self.model, self.height, self.width = model, height, width

    def forward(self, image: torch.Tensor):
        outputs = self.model([{"image": image, "height": self.height, "width": self.width}])
        return tuple(_tensors(outputs))


def _activation_handle(inputs, outputs):
    # The op's result only: san_det::local_attention's second output are the probabilities its
    # backward keeps, not an activation of the network.
    return int(torch.tensor(get_shape(outputs[0])).prod())


def analyze(cfg, tasks, input_size=None, max_depth=3) -> Dict[str, Any]:
    """Run the requested analyses; returns the numbers that :func:`main` prints."""
    model = build_model(cfg).eval()
    inputs = dummy_inputs(cfg, input_size)
    h, w = inputs[0]["image"].shape[-2:]
    report: Dict[str, Any] = {"input_size": (int(h), int(w))}
    if "parameter" in tasks:
        report["parameters"] = parameter_count(model)[""]
        trainable = (p.numel() for p in model.parameters() if p.requires_grad)
        report["trainable_parameters"] = sum(trainable)
        report["parameter_table"] = parameter_count_table(model, max_depth=max_depth)
    if "flop" in tasks or "activation" in tasks:
        wrapper = ImageToTensors(model, int(h), int(w)).eval()
        traced_inputs = (inputs[0]["image"],)
    if "flop" in tasks:
        flops = SanDetFlopCountAnalysis(wrapper, traced_inputs)
        flops.set_op_handle(**{name: None for name in IGNORED_OPS})
        flops.uncalled_modules_warnings(False)
        report["flops"] = flops.total()
        report["flops_by_operator"] = dict(flops.by_operator())
        report["flop_table"] = flop_count_table(flops, max_depth=max_depth)
        report["unsupported_ops"] = dict(flops.unsupported_ops())
    if "activation" in tasks:
        acts = ActivationCountAnalysis(wrapper, traced_inputs)
        acts.set_op_handle(**{name: _activation_handle for name in ATTENTION_OP_HANDLES})
        acts.set_op_handle(**{name: None for name in IGNORED_OPS})
        acts.unsupported_ops_warnings(False)
        acts.uncalled_modules_warnings(False)
        report["activations"] = acts.total()
        report["activations_by_operator"] = dict(acts.by_operator())
    if "structure" in tasks:
        report["structure"] = str(model)
    return report


def print_report(report: Dict[str, Any], config_file: str) -> None:
    h, w = report["input_size"]
    print(f"config: {config_file}   input: 1x3x{h}x{w}")
    if "parameters" in report:
        print(report["parameter_table"])
        n = report["parameters"]
        print(f"Parameters: {n:,} ({n / 1e6:.2f} M); trainable {report['trainable_parameters']:,}")
    if "flops" in report:
        print(report["flop_table"])
        by_op = Counter(report["flops_by_operator"])
        print("multiply-adds by operator (G): " + ", ".join(
            f"{k} {v / 1e9:.3f}" for k, v in by_op.most_common()
        ))  # fmt: skip
        if report["unsupported_ops"]:
            print(f"not counted (no multiply-adds or unknown): {report['unsupported_ops']}")
        g = report["flops"] / 1e9
        print(f"FLOPs: {g:.3f} G multiply-adds (fvcore / SAN convention) = {2 * g:.2f} B FLOPS "
              "(SASA convention, multiply-add = 2)")  # fmt: skip
    if "activations" in report:
        print(f"Activations: {report['activations'] / 1e6:.2f} M")
    if "structure" in report:
        print(report["structure"])


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        cfg = config_from_args(args)
        try:
            report = analyze(cfg, args.tasks, args.input_size, args.max_depth)
        except ValueError as e:  # e.g. SAN's reflection padding on a too small --input-size
            raise UserInputError(f"the model cannot take the input: {e}") from None
    except UserInputError as e:
        print(f"analyze_model.py: error: {e}", file=sys.stderr)
        return 2
    print_report(report, args.config_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
