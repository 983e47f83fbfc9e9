"""metrics.json gets whole lines or none: a write that fails half-way (a file size limit, as a
full disk) cuts the file back to its last complete line and raises ResultsWriteError."""

import json
import subprocess
import sys

import pytest

from tests.helpers.scripts import child_env

_CHILD = """
import json, resource, sys
from san_det.engine.metrics_json import FiniteJSONWriter
from san_det.engine.results_files import ResultsWriteError
from detectron2.utils.events import EventStorage

resource.setrlimit(resource.RLIMIT_FSIZE, (300, 300))
writer = FiniteJSONWriter(sys.argv[1])
with EventStorage(0) as storage:
    storage.put_scalars(loss=float("nan"), lr=0.1)
    storage.iter = 1
    storage.put_scalars(**{f"metric_{i}": 1.0 for i in range(20)})  # a line over the limit
    try:
        writer.write()
    except ResultsWriteError as e:
        print(e)
        sys.exit(1)
"""


@pytest.mark.slow
def test_a_failed_append_leaves_whole_lines(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"iteration": -1, "note": "an earlier run"}) + "\n")
    before = path.read_text()
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path)],
        capture_output=True, text=True, timeout=300, env=child_env(helpers=True),
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stdout.strip() == (
        f"cannot write {path}: File too large (EFBIG); no partial file was left"
    )
    text = path.read_text()
    assert text.startswith(before) and text.endswith("\n")
    rows = [json.loads(line) for line in text.splitlines()]  # every line complete
    assert [r["iteration"] for r in rows] == [-1, 0]  # iteration 1's line did not fit: not there
    assert rows[1]["loss"] is None  # NaN written as null
