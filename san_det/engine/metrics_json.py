"""``metrics.json`` that stays valid JSON: NaN and inf are written as ``null``.

detectron2's ``JSONWriter`` writes ``json.dumps`` lines, which spell NaN as ``NaN``, a token JSON
does not have (``jq``, JavaScript and strict parsers reject the file). COCO evaluation reports NaN
for an area range without objects (``APl`` on small images) and for a category without
annotations, so such values are common. :class:`FiniteJSONWriter` writes them as ``null``, and
appends whole lines only: a write that fails (disk full) cuts the file back to its last complete
line and raises :class:`~san_det.engine.results_files.ResultsWriteError`.
"""

import json
import math
import os
from typing import Any

from detectron2.utils.events import JSONWriter

from .results_files import append_whole_lines

__all__ = ["FiniteJSONWriter"]


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    return value


class _FiniteJSONLines:
    """File proxy: rewrites each JSON line it is given with NaN/inf as null."""

    def __init__(self, file_handle):
        self._file = file_handle

    def write(self, text: str) -> int:
        lines = [
            json.dumps(_finite_or_none(json.loads(line)), sort_keys=True, allow_nan=False)
            for line in text.splitlines()
            if line.strip()
        ]
        text = "".join(line + "\n" for line in lines)
        append_whole_lines(self._file, text)  # whole lines or none, even on a full disk
        return len(text)

    def __getattr__(self, name: str):
        return getattr(self._file, name)


class FiniteJSONWriter(JSONWriter):
    """detectron2's ``JSONWriter`` (same arguments, same lines) with NaN/inf written as null."""

    def __init__(self, json_file: str, window_size: int = 20):
        super().__init__(json_file, window_size)
        self._file_handle = _FiniteJSONLines(self._file_handle)

    @classmethod
    def in_output_dir(cls, output_dir: str) -> "FiniteJSONWriter":
        """The writer of ``<output_dir>/metrics.json`` (detectron2's ``default_writers`` file)."""
        return cls(os.path.join(output_dir, "metrics.json"))
