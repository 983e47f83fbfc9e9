"""Build the config from command-line arguments, checking the user's input before anything runs.

Every check here happens before a file is written, so bad input never leaves partial output
(a ``config.yaml`` or log) that a later run could mistake for a real one.
"""

import os
import tempfile
from typing import Iterable, List

import torch
import yaml
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog

from ..data.config import register_config_datasets
from ..data.preparers import prepare_dataset
from .errors import UserInputError

__all__ = [
    "merge_cfg",
    "validate_datasets",
    "check_output_dir",
]


def _merge(cfg: CfgNode, what: str, merge) -> None:
    try:
        merge()
    except KeyError as e:
        # yacs: "Non-existent config key: MODEL.FOO"
        msg = e.args[0] if e.args else str(e)
        raise UserInputError(f"{what}: {msg}") from None
    except TypeError as e:
        if "NoneType" in str(e):  # yacs on an empty _BASE_ file
            raise UserInputError(
                f"{what}: a _BASE_ file it names is empty or holds no KEY: value entries ({e})"
            ) from None
        raise UserInputError(f"{what}: {e}") from None
    except (ValueError, AssertionError, yaml.YAMLError) as e:
        raise UserInputError(f"{what}: {e}") from None
    except RecursionError:
        raise UserInputError(f"{what}: its _BASE_ files include each other (a cycle)") from None
    except OSError as e:
        raise UserInputError(f"{what}: cannot read {e.filename or e}: {e.strerror or e}") from None


def _check_base_cycle(config_file: str) -> None:
    """Follow the ``_BASE_`` chain as detectron2 does (relative to the including file); a file
    that comes back is a cycle (yacs recurses until Python's limit, 3,000 lines of traceback)."""
    chain = [os.path.realpath(config_file)]
    while True:
        try:
            with open(chain[-1]) as f:
                base = (yaml.safe_load(f) or {}).get("_BASE_")
        except (OSError, yaml.YAMLError, AttributeError):
            return  # reported with the file's name when merged
        if not isinstance(base, str) or base.startswith(("https://", "http://")):
            return
        base = os.path.expanduser(base)
        base = os.path.realpath(os.path.join(os.path.dirname(chain[-1]), base))
        if base in chain:
            loop = " -> ".join(os.path.relpath(p) for p in chain[chain.index(base) :] + [base])
            raise UserInputError(f"config file {config_file}: _BASE_ cycle: {loop}")
        chain.append(base)


def _check_config_file(config_file: str) -> None:
    """An existing file holding a mapping of config keys (yacs fails obscurely on others)."""
    if not config_file:
        raise UserInputError("--config-file is required (e.g. configs/Demo/shapes_retinanet.yaml)")
    if os.path.isdir(config_file):
        raise UserInputError(f"--config-file {config_file} is a folder, not a yaml file")
    if not os.path.isfile(config_file):
        raise UserInputError(f"config file not found: {config_file}")
    try:
        with open(config_file) as f:
            content = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return  # reported with the file's name when merged
    if content is None:
        raise UserInputError(f"config file {config_file} is empty (no KEY: value entries)")
    if not isinstance(content, dict):
        raise UserInputError(
            f"config file {config_file} must hold KEY: value entries, not a "
            f"{type(content).__name__}"
        )
    _check_base_cycle(config_file)


def _check_overrides(opts: List[str]) -> None:
    flags = [o for o in opts[::2] if isinstance(o, str) and o.startswith("-")]
    if flags:
        raise UserInputError(
            f"{flags[0]} comes after the KEY VALUE overrides, where it is read as a config key: "
            f"put flags before them (train_net.py --config-file FILE {flags[0]} ... KEY VALUE ...)"
        )
    if len(opts) % 2:
        raise UserInputError(
            f"overrides must be KEY VALUE pairs, got an odd number ({len(opts)}): {opts}"
        )


def _check_weights_file(weights: str) -> None:
    if not weights or "://" in weights:
        return
    if os.path.isdir(weights):
        found = sorted(n for n in os.listdir(weights) if n.endswith((".pth", ".pkl")))
        hint = f"; it holds {', '.join(found[:5])}" if found else "; it holds no .pth/.pkl file"
        raise UserInputError(
            f"MODEL.WEIGHTS {weights} is a folder: name a checkpoint file in it "
            f"(e.g. {os.path.join(weights, found[-1] if found else 'model_final.pth')}){hint}"
        )
    if not os.path.isfile(weights):
        raise UserInputError(f"MODEL.WEIGHTS file not found: {weights}")


def check_output_dir(path: str, option: str = "OUTPUT_DIR") -> None:
    """Raise :class:`UserInputError` unless ``path`` is (or can become) a writable folder;
    the message names ``option``, where the path came from.

    Leaves nothing behind: folders made for the check are removed again, so a run that fails a
    later check leaves no empty output folder. Runs started together on one new folder (the
    machines of one job) each make and remove it: a check that loses its folder to another's
    clean-up checks again.
    """
    if not path:
        return
    target = os.path.abspath(path)
    for attempt in range(_OUTPUT_DIR_CHECK_ATTEMPTS):
        try:
            _probe_writable(target)
            return
        except FileNotFoundError as e:
            error = e  # a folder made or seen by the probe was removed meanwhile
        except OSError as e:
            error = e
            break
    raise UserInputError(
        f"{option} {path!r} cannot be written ({error.strerror or error}: "
        f"{error.filename or target}); pass another with {option} /some/dir"
    ) from None


_OUTPUT_DIR_CHECK_ATTEMPTS = 5


def _probe_writable(target: str) -> None:
    """Make the missing folders of ``target``, write and delete a file in it, remove the folders
    it made (those another run has written into meanwhile stay)."""
    created = []
    probe = target
    while not os.path.exists(probe):
        created.append(probe)
        probe = os.path.dirname(probe)
    try:
        for folder in reversed(created):
            os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target, prefix=".write_test_"):
            pass
    finally:
        for folder in created:
            try:
                os.rmdir(folder)
            except OSError:
                pass


def merge_cfg(
    cfg: CfgNode,
    config_file: str,
    opts: Iterable[str] = (),
    freeze: bool = True,
    check_output: bool = True,
) -> CfgNode:
    """``cfg`` (a config holding every key, :func:`san_det.config.get_san_det_cfg`) merged with
    ``config_file`` and ``KEY VALUE`` opts, in place; returned. :func:`san_det.config.setup_cfg`
    is the entry point.

    ``check_output=False`` skips the OUTPUT_DIR probe: for the worker processes of a launch,
    whose launcher already ran it (workers probing one folder at once would race).

    Raises:
        UserInputError: missing or empty config file, unknown key, bad value, a flag after the
            overrides, a malformed DATASETS.COCO_INSTANCES entry, unwritable OUTPUT_DIR, missing
            local MODEL.WEIGHTS file (or a folder), a CUDA device without a GPU.
    """
    _check_config_file(config_file)
    opts = list(opts)
    _check_overrides(opts)
    _merge(cfg, config_file, lambda: cfg.merge_from_file(config_file))
    _merge(cfg, "command-line overrides", lambda: cfg.merge_from_list(opts))
    register_config_datasets(cfg)  # DATASETS.COCO_INSTANCES, IMAGENET_ROOT: in every process
    _check_weights_file(cfg.MODEL.WEIGHTS)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        raise UserInputError(
            f"MODEL.DEVICE is {cfg.MODEL.DEVICE!r} but no CUDA GPU is available; "
            "add `MODEL.DEVICE cpu` to run on the CPU"
        )
    if check_output:
        check_output_dir(cfg.OUTPUT_DIR)
    if freeze:
        cfg.freeze()
    return cfg


def _dataset_files(name: str) -> List[str]:
    meta = MetadataCatalog.get(name)
    return [p for p in (getattr(meta, "json_file", None), getattr(meta, "image_root", None)) if p]


def validate_datasets(names: Iterable[str]) -> None:
    """Check that every dataset is registered and its files exist (or make on-demand ones).

    Raises:
        UserInputError: naming the dataset and the path that is missing.
    """
    registered = set(DatasetCatalog.list())
    for name in names:
        if name not in registered:
            raise UserInputError(
                f"dataset {name!r} is not registered. Registered: {', '.join(sorted(registered))}. "
                "For your own COCO json add [name, json_file, image_root] to "
                'DATASETS.COCO_INSTANCES (README: "Train on your own COCO data")'
            )
        if prepare_dataset(name):
            continue
        missing = [p for p in _dataset_files(name) if not os.path.exists(p)]
        if missing:
            root = os.environ.get("DETECTRON2_DATASETS", "datasets")
            hint = ""
            if name.startswith("coco"):
                hint = (
                    f" COCO is read from $DETECTRON2_DATASETS/coco (DETECTRON2_DATASETS={root!r}): "
                    "coco/annotations/instances_{train,val}2017.json, coco/train2017/, coco/val2017/."
                )
            raise UserInputError(
                f"dataset {name!r} not found: missing {', '.join(map(repr, missing))}.{hint}"
            )
