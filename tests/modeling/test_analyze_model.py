"""tools/analyze_model.py on CPU without a dataset: parameters, FLOPs (attention counted)."""

import importlib.util
import os

import pytest
from tests.helpers.modeling import ROOT, config_path

_spec = importlib.util.spec_from_file_location(
    "analyze_model", os.path.join(ROOT, "tools", "analyze_model.py")
)
analyze_model = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(analyze_model)


@pytest.mark.parametrize(
    "config, attention_op, size",
    [
        (config_path("retinanet_sasa50_attention_fpn_head"), "local_attention", 64),
        (config_path("retinanet_san10_pairwise"), "aggregation", 128),
        (os.path.join(ROOT, "configs", "ImageNet", "sasa26.yaml"), "local_attention", 64),
    ],
    ids=["sasa_everywhere", "san10", "imagenet_sasa26"],
)
def test_analyze_reports_parameters_and_attention_flops(config, attention_op, size, capsys):
    args = analyze_model.parse_args(
        ["--config-file", config, "--tasks", "parameter", "flop", "activation", "--input-size",
         str(size), str(size), "--max-depth", "1"]
    )  # fmt: skip
    cfg = analyze_model.config_from_args(args)
    report = analyze_model.analyze(cfg, args.tasks, args.input_size, args.max_depth)
    assert report["input_size"] == (size, size)
    assert report["parameters"] == report["trainable_parameters"] > 1e6
    assert report["flops_by_operator"][attention_op] > 0
    assert report["flops"] == pytest.approx(sum(report["flops_by_operator"].values()))
    assert report["activations"] > 0
    analyze_model.print_report(report, config)
    out = capsys.readouterr().out
    assert f"Parameters: {report['parameters']:,}" in out
    assert "G multiply-adds" in out and "B FLOPS (SASA convention" in out


def test_main_and_bad_size(capsys):
    config = os.path.join(ROOT, "configs", "ImageNet", "san10_patchwise.yaml")
    assert analyze_model.main(["--config-file", config, "--tasks", "parameter"]) == 0
    assert "Parameters: 11,841,124" in capsys.readouterr().out  # the official SAN10 patchwise
    with pytest.raises(SystemExit):
        analyze_model.parse_args(["--config-file", config, "--input-size", "0", "64"])
