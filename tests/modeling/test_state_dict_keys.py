"""The state-dict keys (and shapes) of every shipped model config stay as they are.

Checkpoints, the official-weight converters and the weight-loading tests rely on these names, so
a refactoring of the modeling code must not rename, add or drop a parameter or buffer. The models
are built on the ``meta`` device (no memory, no initialisation), and each config's sorted
``"key shape"`` lines are compared by count and SHA-256 with ``state_dict_keys.json``.

After a deliberate change of a model, regenerate the file with
``python tests/modeling/test_state_dict_keys.py --write`` and say why in the commit.
"""

import hashlib
import json
import os
import sys

import pytest
import torch
from detectron2.modeling import META_ARCH_REGISTRY
from tests.helpers.modeling import ROOT

from san_det.config import get_san_det_cfg

PINNED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "state_dict_keys.json")
CONFIGS = sorted(
    os.path.relpath(os.path.join(folder, name), ROOT).replace(os.sep, "/")
    for folder, _, names in os.walk(os.path.join(ROOT, "configs"))
    for name in names
    if name.endswith(".yaml") and not name.startswith("Base-")
)


def key_lines(config: str):
    """Sorted ``"key shape"`` lines of the state dict of ``config``'s model (built on meta)."""
    cfg = get_san_det_cfg()
    cfg.merge_from_file(os.path.join(ROOT, config))
    cfg.MODEL.DEVICE = "cpu"
    with torch.device("meta"):
        model = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)(cfg)
    return sorted(f"{k} {tuple(v.shape)}" for k, v in model.state_dict().items())


def fingerprint(lines):
    return {"count": len(lines), "sha256": hashlib.sha256("\n".join(lines).encode()).hexdigest()}


def _pinned():
    with open(PINNED) as f:
        return json.load(f)


def test_every_config_is_pinned():
    assert sorted(_pinned()) == CONFIGS


@pytest.mark.parametrize("config", CONFIGS)
def test_state_dict_keys_are_unchanged(config):
    pinned = _pinned()[config]
    got = fingerprint(key_lines(config))
    assert got == pinned, (
        f"{config}: the model's state-dict keys changed ({pinned['count']} -> {got['count']} "
        f"entries): checkpoints would no longer load; see this file's docstring"
    )


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/modeling/test_state_dict_keys.py --write")
    with open(PINNED, "w") as f:
        json.dump({c: fingerprint(key_lines(c)) for c in CONFIGS}, f, indent=1, sort_keys=True)
        f.write("\n")
