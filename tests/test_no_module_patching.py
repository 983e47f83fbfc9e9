"""Nothing in san_det, train_net.py or tools/ assigns into another module: ``san_det/compat.py``
(and ``_san_det_compat_hook.py``, which loads it) is the one place that patches detectron2 or any
third-party module. Every file is read with ``ast``; an assignment, augmented assignment,
``del``, ``setattr`` or ``delattr`` whose target is an attribute of a name bound by an import
(``comm._LOCAL_PROCESS_GROUP = ...``, ``setattr(d2_defaults, "SimpleTrainer", ...)``,
``DefaultTrainer.run_step = ...``) fails with the file and line.
"""

import ast
from pathlib import Path
from typing import List, Optional

from tests.helpers.paths import REPO_ROOT

ALLOWED = {"compat.py", "_san_det_compat_hook.py"}
SETTERS = ("setattr", "delattr")


def _checked_files(root: Path) -> List[Path]:
    files = [p for part in ("san_det", "tools") for p in sorted((root / part).rglob("*.py"))]
    return [p for p in files + [root / "train_net.py"] if p.name not in ALLOWED]


def _root_name(node: ast.AST) -> Optional[str]:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def module_assignments(source: str, filename: str = "<source>") -> List[str]:
    """``"<file>:<line>: <target>"`` for each assignment into an imported name's attributes."""
    tree = ast.parse(source, filename=filename)
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                imported.add(alias.asname or alias.name.split(".")[0])
    found = []  # (line, target)
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, (ast.Assign, ast.Delete)):
            targets = [t for target in node.targets for t in ast.walk(target)]
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = list(ast.walk(node.target))
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) in SETTERS:
            if node.args and _root_name(node.args[0]) in imported:
                found.append((node.lineno, ast.unparse(node)))
        for target in targets:
            stored = isinstance(target, ast.Attribute) and not isinstance(target.ctx, ast.Load)
            if stored and _root_name(target) in imported:
                found.append((node.lineno, ast.unparse(target)))
    return [f"{filename}:{line}: {target}" for line, target in sorted(found)]


def test_only_compat_assigns_into_other_modules():
    found = []
    for path in _checked_files(REPO_ROOT):
        found += module_assignments(path.read_text(), str(path.relative_to(REPO_ROOT)))
    listing = "\n".join(found)
    assert not found, f"assignments into imported modules (only san_det/compat.py may):\n{listing}"


def test_the_check_finds_each_form_and_leaves_local_objects_alone():
    source = """
import detectron2.utils.comm
from detectron2.engine import defaults as d2_defaults, DefaultTrainer
from detectron2.utils import comm

def f(model, trainer):
    import torch
    comm._LOCAL_PROCESS_GROUP = None
    detectron2.utils.comm.x += 1
    setattr(d2_defaults, "SimpleTrainer", None)
    delattr(torch.nn, "Linear")
    DefaultTrainer.run_step = None
    del d2_defaults.AMPTrainer
    a, torch.y = 1, 2
    model.weight = None
    trainer.model.head = None
    setattr(model, "x", 1)
    local = comm.get_rank()
    local.x = 1
"""
    found = module_assignments(source)
    lines = [int(f.split(":")[1]) for f in found]
    assert lines == [8, 9, 10, 11, 12, 13, 14], found
    assert found[0] == "<source>:8: comm._LOCAL_PROCESS_GROUP"
