"""Official hszhao/SAN checkpoints -> our classifier and detection backbone.

The official key layout is written out here from the official model definition (model/san.py of
hszhao/SAN: ``SAN``, ``Bottleneck``, ``SAM``), independently of san_det's SAN code, so the test
checks that the released files map onto our modules 1:1 with the right shapes.
"""

import logging
import os
import signal
from collections import OrderedDict

import pytest
import torch
from detectron2.modeling import build_model

from san_det.errors import CheckpointError
from san_det.config import get_san_det_cfg
from san_det.classification.convert_san import (
    convert_official_san_to_classifier,
    convert_official_san_to_detection,
)
from tests.helpers.paths import REPO_ROOT, config_path
from tests.helpers.held_runs import HeldRun
from tests.helpers.restated import assert_close_f64, restated_san
from tests.helpers.scripts import child_env, error_lines, load_script

LAYERS = {10: [2, 1, 2, 4, 1], 15: [3, 2, 3, 5, 2], 19: [3, 3, 4, 6, 3]}


def _bn(prefix, c):
    return [
        (f"{prefix}.weight", (c,)),
        (f"{prefix}.bias", (c,)),
        (f"{prefix}.running_mean", (c,)),
        (f"{prefix}.running_var", (c,)),
        (f"{prefix}.num_batches_tracked", ()),
    ]


def _conv(prefix, cout, cin, bias):
    bias = [(f"{prefix}.bias", (cout,))] if bias else []
    return [(f"{prefix}.weight", (cout, cin, 1, 1))] + bias


def official_san_shapes(sa_type, depth, kernels=(3, 7, 7, 7, 7), classes=1000, share=8):
    """Keys and shapes of ``DataParallel(san(sa_type, layers, kernels, classes)).state_dict()``."""
    shapes = []
    c = 64
    shapes += _conv("conv_in", c, 3, False) + _bn("bn_in", c)
    prev = c
    for i, (blocks, k) in enumerate(zip(LAYERS[depth], kernels)):
        c = 64 if i == 0 else 64 * 2 ** (i + 1)
        shapes += _conv(f"conv{i}", c, prev, False) + _bn(f"bn{i}", c)
        rel, mid = c // 16, c // 4
        for b in range(blocks):
            p = f"layer{i}.{b}"
            shapes += _bn(f"{p}.bn1", c)
            shapes += _conv(f"{p}.sam.conv1", rel, c, True) + _conv(f"{p}.sam.conv2", rel, c, True)
            shapes += _conv(f"{p}.sam.conv3", mid, c, True)
            if sa_type == "pairwise":
                shapes += _bn(f"{p}.sam.conv_w.0", rel + 2)
                shapes += _conv(f"{p}.sam.conv_w.2", rel, rel + 2, False)
                shapes += _bn(f"{p}.sam.conv_w.3", rel)
                shapes += _conv(f"{p}.sam.conv_w.5", mid // share, rel, True)
                shapes += _conv(f"{p}.sam.conv_p", 2, 2, True)
            else:
                cin = rel * (k * k + 1)
                shapes += _bn(f"{p}.sam.conv_w.0", cin)
                shapes += _conv(f"{p}.sam.conv_w.2", mid // share, cin, False)
                shapes += _bn(f"{p}.sam.conv_w.3", mid // share)
                shapes += _conv(f"{p}.sam.conv_w.5", k * k * mid // share, mid // share, True)
            shapes += _bn(f"{p}.bn2", mid) + _conv(f"{p}.conv", c, mid, True)
        prev = c
    shapes += [("fc.weight", (classes, prev)), ("fc.bias", (classes,))]
    return OrderedDict(("module." + k, s) for k, s in shapes)


def _official_checkpoint(sa_type, depth, seed=0):
    g = torch.Generator().manual_seed(seed)
    state = OrderedDict()
    for k, shape in official_san_shapes(sa_type, depth).items():
        if k.endswith("num_batches_tracked"):
            state[k] = torch.tensor(7)
        else:
            state[k] = torch.randn(shape, generator=g)
    return {"epoch": 100, "state_dict": state, "top1_val": 0.749}


def _classifier_cfg(sa_type, depth):
    cfg = get_san_det_cfg(config_path("ImageNet", f"san{depth}_{sa_type}.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    return cfg


@pytest.mark.parametrize("sa_type", ["pairwise", "patchwise"])
def test_official_san10_checkpoint_loads_into_our_classifier(sa_type):
    official = _official_checkpoint(sa_type, 10)
    model = build_model(_classifier_cfg(sa_type, 10))
    state = convert_official_san_to_classifier(official, model.state_dict())
    assert len(state) == len(official["state_dict"]) == len(model.state_dict())
    model.load_state_dict(state, strict=True)
    src = official["state_dict"]
    torch.testing.assert_close(model.classifier.weight, src["module.fc.weight"])
    torch.testing.assert_close(model.backbone.conv_in.weight, src["module.conv_in.weight"])
    torch.testing.assert_close(
        model.backbone.layer3[3].sam.conv_w[5].bias, src["module.layer3.3.sam.conv_w.5.bias"]
    )
    torch.testing.assert_close(model.backbone.bn4.running_var, src["module.bn4.running_var"])


@pytest.mark.parametrize("sa_type", ["pairwise", "patchwise"])
def test_converted_classifier_computes_the_official_network(sa_type):
    """Every official tensor lands under its own name (``module.X`` -> ``backbone.X``,
    ``module.fc`` -> ``classifier``), and the classifier's logits are the official SAN's forward
    (restated in plain torch) followed by global average pooling and the official ``fc``."""
    official = _official_checkpoint(sa_type, 10, seed=1)
    src = official["state_dict"]
    for k, v in src.items():  # positive variances, weights of a trained network's scale
        if k.endswith("running_var"):
            src[k] = v.abs() + 0.5
        elif v.dim() in (2, 4):
            src[k] = v / v[0].numel() ** 0.5
    model = build_model(_classifier_cfg(sa_type, 10))
    state = convert_official_san_to_classifier(official, model.state_dict())
    renamed = {
        ("classifier." + k[len("module.fc."):]) if k.startswith("module.fc.")
        else "backbone." + k[len("module."):]: v for k, v in src.items()
    }  # fmt: skip
    assert set(state) == set(renamed)
    for k, v in renamed.items():
        assert torch.equal(state[k], v), k
    model.load_state_dict(state, strict=True)
    model = model.double().eval()
    x = torch.randn(1, 3, 128, 128, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = model.forward_head(model.forward_features(x))
        pooled = restated_san(model.backbone, x)["res5"].mean(dim=(2, 3))
        expected = pooled @ src["module.fc.weight"].double().T + src["module.fc.bias"].double()
    assert_close_f64(logits, expected, "logits")


def test_official_san_checkpoint_into_detection_backbone():
    official = _official_checkpoint("pairwise", 10)
    classifier = build_model(_classifier_cfg("pairwise", 10))
    det_cfg = get_san_det_cfg(config_path("COCO-Detection", "retinanet_san10_pairwise.yaml"))
    det_cfg.MODEL.DEVICE = "cpu"
    detector = build_model(det_cfg)
    state = convert_official_san_to_detection(
        official, classifier.state_dict(), detector.state_dict()
    )
    assert all(k.startswith("backbone.bottom_up.") for k in state)
    incompatible = detector.load_state_dict(state, strict=False)
    assert not incompatible.unexpected_keys
    assert not [k for k in incompatible.missing_keys if k.startswith("backbone.bottom_up.")]
    torch.testing.assert_close(
        detector.backbone.bottom_up.layer2[1].sam.conv_p.weight,
        official["state_dict"]["module.layer2.1.sam.conv_p.weight"],
    )


def test_official_san_into_a_detector_puts_every_tensor_under_its_name():
    """``module.X`` -> ``backbone.bottom_up.X`` for every official tensor but ``fc`` (and the BN
    counters FrozenBN lacks), values unchanged; the detector's SAN then computes what the
    converted classifier's does."""
    official = _official_checkpoint("pairwise", 10, seed=3)
    src = official["state_dict"]
    for k, v in src.items():
        if k.endswith("running_var"):
            src[k] = v.abs() + 0.5
    classifier = build_model(_classifier_cfg("pairwise", 10))
    det_cfg = get_san_det_cfg(config_path("COCO-Detection", "retinanet_san10_pairwise.yaml"))
    det_cfg.MODEL.DEVICE = "cpu"
    detector = build_model(det_cfg)
    target = detector.state_dict()
    state = convert_official_san_to_detection(official, classifier.state_dict(), target)
    expected = {"backbone.bottom_up." + k[len("module."):]: v for k, v in src.items()
                if not k.startswith("module.fc.")}  # fmt: skip
    expected = {k: v for k, v in expected.items() if k in target or "num_batches" not in k}
    assert set(state) == set(expected)
    for k, v in expected.items():
        assert torch.equal(state[k], v), k
    detector.load_state_dict(state, strict=False)
    classifier.load_state_dict(
        convert_official_san_to_classifier(official, classifier.state_dict())
    )
    x = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours = detector.backbone.bottom_up.double().eval()(x.double())["res5"]
        theirs = classifier.backbone.double().eval()(x.double())["res5"]
    assert_close_f64(ours, theirs, "res5")


def test_official_san_errors_name_the_key():
    model = build_model(_classifier_cfg("pairwise", 10))
    target = model.state_dict()
    extra = _official_checkpoint("pairwise", 10)
    extra["state_dict"]["module.layer9.0.sam.conv1.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"'module\.layer9\.0\.sam\.conv1\.weight'"):
        convert_official_san_to_classifier(extra, target)
    missing = _official_checkpoint("pairwise", 10)
    del missing["state_dict"]["module.layer1.0.sam.conv_p.bias"]
    with pytest.raises(CheckpointError, match=r"'backbone\.layer1\.0\.sam\.conv_p\.bias'"):
        convert_official_san_to_classifier(missing, target)
    pattern = r"'module\.layer0\.0\.sam\.conv_w\.0\.\w+' has"
    with pytest.raises(CheckpointError, match=pattern):
        # patchwise checkpoint into a pairwise model
        convert_official_san_to_classifier(_official_checkpoint("patchwise", 10), target)
    with pytest.raises(CheckpointError, match=r"'module\.fc\.weight' has shape"):
        wrong = _official_checkpoint("pairwise", 10)
        wrong["state_dict"]["module.fc.weight"] = torch.zeros(10, 2048)
        convert_official_san_to_classifier(wrong, target)
    with pytest.raises(CheckpointError, match=r"'module\.layer0\.2\..*no counterpart"):
        convert_official_san_to_classifier(_official_checkpoint("pairwise", 15), target)
    with pytest.raises(CheckpointError, match="not a tensor"):
        convert_official_san_to_classifier({"state_dict": {"module.fc.weight": "x"}}, target)


def _load_tool(name):
    return load_script(f"tools/{name}.py")


def test_convert_tool_end_to_end(tmp_path, capsys):
    tool = _load_tool("convert_san_official")
    src, out = tmp_path / "san10_pairwise.pth", tmp_path / "converted.pth"
    torch.save(_official_checkpoint("pairwise", 10), src)
    config = config_path("ImageNet", "san10_pairwise.yaml")
    args = ["--config-file", config, "--input", str(src), "--output", str(out)]
    assert tool.main(args) == 0
    converted = torch.load(out, map_location="cpu", weights_only=False)
    assert converted["san_det_classifier"]["input_format"] == "RGB"
    assert "classifier.weight" in converted["model"]
    # A patchwise file with the pairwise config fails, naming a key: bad input, exit status 2.
    torch.save(_official_checkpoint("patchwise", 10), src)
    assert tool.main(args) == 2
    assert "module.layer0.0.sam.conv_w.0." in capsys.readouterr().err
    args[3] = str(tmp_path / "missing.pth")
    assert tool.main(args) == 2


@pytest.fixture(scope="module")
def converted_detection_backbone(tmp_path_factory):
    """An official SAN10 pairwise file converted with --detection-config (the shipped config)."""
    folder = tmp_path_factory.mktemp("san_det_input")
    src, out = folder / "official.pth", folder / "retinanet_san10_pairwise_init.pth"
    torch.save(_official_checkpoint("pairwise", 10), src)
    args = [
        "--config-file", config_path("ImageNet", "san10_pairwise.yaml"),
        "--detection-config", DETECTION_SAN10, "--input", str(src), "--output", str(out),
    ]  # fmt: skip
    assert _load_tool("convert_san_official").main(args) == 0
    return out


DETECTION_SAN10 = config_path("COCO-Detection", "retinanet_san10_pairwise.yaml")
D2_DEFAULT_INPUT = [
    "INPUT.FORMAT", "BGR", "MODEL.PIXEL_MEAN", "[103.53, 116.28, 123.675]",
    "MODEL.PIXEL_STD", "[1.0, 1.0, 1.0]",
]  # fmt: skip


def _san10_detector(*opts):
    cfg = get_san_det_cfg(DETECTION_SAN10, ["MODEL.DEVICE", "cpu", *opts])
    return cfg, build_model(cfg)


def test_converted_backbone_records_the_official_input(converted_detection_backbone):
    from san_det.classification.convert_san import OFFICIAL_SAN_INPUT
    from san_det.modeling.input_info import INPUT_INFO_KEY

    saved = torch.load(converted_detection_backbone, map_location="cpu", weights_only=True)
    assert saved[INPUT_INFO_KEY] == OFFICIAL_SAN_INPUT
    # the shipped SAN detection configs normalise as the official models do
    cfg, detector = _san10_detector()
    assert cfg.INPUT.FORMAT == "RGB"
    assert list(cfg.MODEL.PIXEL_MEAN) == OFFICIAL_SAN_INPUT["pixel_mean"]
    assert list(cfg.MODEL.PIXEL_STD) == OFFICIAL_SAN_INPUT["pixel_std"]
    from san_det.detection import DetectorCheckpointer

    DetectorCheckpointer(detector).resume_or_load(str(converted_detection_backbone), resume=False)
    torch.testing.assert_close(
        detector.backbone.bottom_up.layer2[1].sam.conv_p.weight,
        saved["model"]["backbone.bottom_up.layer2.1.sam.conv_p.weight"],
    )


def test_a_converted_backbone_in_a_model_normalising_otherwise_is_refused(
    converted_detection_backbone, caplog
):
    from san_det.detection import DetectorCheckpointer
    from san_det.modeling.input_info import InputMismatchError

    _, detector = _san10_detector(*D2_DEFAULT_INPUT)
    before = detector.backbone.bottom_up.conv_in.weight.detach().clone()
    path = str(converted_detection_backbone)
    with pytest.raises(InputMismatchError) as info:
        DetectorCheckpointer(detector).resume_or_load(path, resume=False)
    message = str(info.value)
    assert path in message and "\n" not in message
    assert "INPUT.FORMAT RGB (this model: BGR)" in message
    assert "MODEL.PIXEL_STD [58.395, 57.12, 57.375] (this model: [1.0, 1.0, 1.0])" in message
    assert "MODEL.WEIGHTS_ALLOW_INPUT_MISMATCH" in message
    torch.testing.assert_close(detector.backbone.bottom_up.conv_in.weight, before)  # not loaded
    with caplog.at_level(logging.WARNING):
        DetectorCheckpointer(detector, allow_input_mismatch=True).resume_or_load(path, resume=False)
    assert "expect other inputs" in caplog.text and "Loading them anyway" in caplog.text


@pytest.mark.slow
def test_train_net_refuses_it_in_one_line_before_writing(converted_detection_backbone, tmp_path):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "train_net.py"), "--config-file", DETECTION_SAN10,
         "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", str(converted_detection_backbone),
         *D2_DEFAULT_INPUT, "OUTPUT_DIR", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300, env=child_env(),
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = error_lines(proc.stderr)
    assert len(errors) == 1 and "expect other inputs" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


def test_convert_tool_warns_about_a_detection_config_of_other_input(tmp_path, capsys):
    src, out = tmp_path / "official.pth", tmp_path / "init.pth"
    torch.save(_official_checkpoint("pairwise", 10), src)
    args = [
        "--config-file", config_path("ImageNet", "san10_pairwise.yaml"),
        "--detection-config", DETECTION_SAN10, "--input", str(src), "--output", str(out),
        "MODEL.PIXEL_STD", "[1.0, 1.0, 1.0]",
    ]  # fmt: skip
    assert _load_tool("convert_san_official").main(args) == 0
    err = capsys.readouterr().err
    assert "warning" in err and "MODEL.PIXEL_STD [58.395, 57.12, 57.375]" in err


@pytest.mark.parametrize("output", ["the input", "a hard link", "a symlink"])
def test_converters_refuse_to_write_over_their_input(tmp_path, capsys, output):
    tool = _load_tool("convert_san_official")
    src = tmp_path / "san10_pairwise.pth"
    torch.save(_official_checkpoint("pairwise", 10), src)
    before = src.read_bytes()
    out = {"the input": src, "a hard link": tmp_path / "h.pth", "a symlink": tmp_path / "s.pth"}
    out = out[output]
    if output == "a hard link":
        os.link(src, out)
    elif output == "a symlink":
        os.symlink(src, out)
    config = config_path("ImageNet", "san10_pairwise.yaml")
    assert tool.main(["--config-file", config, "--input", str(src), "--output", str(out)]) == 2
    errors = error_lines(capsys.readouterr().err, "convert_san_official.py")
    assert errors == [
        f"convert_san_official.py: error: --output {out} is the --input file itself (the same "
        "file, or a link to it): write the converted checkpoint to another file"
    ]
    assert src.read_bytes() == before


def test_converters_bad_input_is_one_line_exit_2(tmp_path, capsys):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint\n" * 20)
    out = tmp_path / "out.pth"
    san = _load_tool("convert_san_official")
    config = config_path("ImageNet", "san10_pairwise.yaml")
    assert san.main(["--config-file", config, "--input", str(garbage), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    errors = error_lines(err, "convert_san_official.py")
    assert len(errors) == 1 and "Traceback" not in err, err
    assert f"cannot read --input {garbage}: not a PyTorch checkpoint" in errors[0]
    # a classification config where the detection config belongs
    det = load_script("tools/convert_classifier_to_detection.py")
    classification = config_path("ImageNet", "sasa26.yaml")
    args = ["--config-file", classification, "--input", str(garbage), "--output", str(out)]
    assert det.main(args) == 2
    err = capsys.readouterr().err
    errors = error_lines(err, "convert_classifier_to_detection.py")
    assert len(errors) == 1 and "is a classification config" in errors[0], err
    assert "Loading them anyway" not in err and not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_converting_leaves_no_output(tmp_path, signum):
    src, out = tmp_path / "san10_pairwise.pth", tmp_path / "converted.pth"
    torch.save(_official_checkpoint("pairwise", 10), src)
    run = HeldRun(
        tmp_path / "logs", "tools/convert_san_official.py",
        "--config-file", config_path("ImageNet", "san10_pairwise.yaml"),
        "--input", str(src), "--output", str(out), hold_at="torch:save",
    )  # fmt: skip
    run.wait_held()  # torch.save has written the whole checkpoint (to a temporary file)
    run.signal_group(signum)
    assert run.wait(60) == 128 + signum, run.output()[-3000:]
    name = signal.Signals(signum).name
    message = f"stopped by {name} during the conversion; {out} was not written"
    run.assert_only_line("convert_san", f"convert_san_official.py: {message}")
    assert sorted(os.listdir(tmp_path)) == ["logs", "san10_pairwise.pth"]
