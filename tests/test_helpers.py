"""The test infrastructure itself: the cuda marker's skip, the shared script helpers, and that
the installed package carries no test code."""

import os
import subprocess
import sys
import textwrap

import torch

from tests.helpers.paths import REPO_ROOT
from tests.helpers.scripts import child_env, error_lines


def test_needs_cuda_is_skipped_without_a_device(pytester):
    """A test marked with ``needs_cuda`` runs where CUDA is available, else is reported skipped."""
    pytester.makeini("[pytest]\nmarkers =\n    cuda: needs a CUDA GPU\n")
    pytester.makeconftest("from tests.conftest import pytest_collection_modifyitems  # noqa\n")
    pytester.makepyfile(test_gpu=textwrap.dedent("""
            from tests.helpers.skips import needs_cuda

            @needs_cuda
            def test_on_gpu():
                pass

            def test_anywhere():
                pass
            """))
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-rs")
    if torch.cuda.is_available():
        result.assert_outcomes(passed=2)
    else:
        result.assert_outcomes(passed=1, skipped=1)
        result.stdout.fnmatch_lines(["SKIPPED *test_gpu.py*: no CUDA device"])


def test_error_lines_keeps_the_scripts_one_line_errors():
    stderr = "log line\ntrain_net.py: error: bad key\npredict.py: error: other\ntrain_net.py: x\n"
    assert error_lines(stderr) == ["train_net.py: error: bad key"]
    assert error_lines(stderr, "predict.py") == ["predict.py: error: other"]
    assert error_lines("") == []


def test_child_env_puts_the_repository_on_the_path_only_when_asked(tmp_path):
    plain = child_env(EXTRA="1")
    assert plain["OMP_NUM_THREADS"] == "1" and plain["EXTRA"] == "1"
    assert plain.get("PYTHONPATH") == os.environ.get("PYTHONPATH")
    with_helpers = child_env(helpers=True)
    assert with_helpers["PYTHONPATH"].split(os.pathsep)[0] == str(REPO_ROOT)
    probe = [sys.executable, "-c", "import tests.helpers.paths as p; print(p.REPO_ROOT)"]
    run = subprocess.run(probe, cwd=tmp_path, env=with_helpers, capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == str(REPO_ROOT), run.stderr


def test_the_package_holds_no_test_code():
    """Test fixtures live in tests/helpers, not in the installed ``san_det``."""
    offenders = []
    for folder, _, files in os.walk(REPO_ROOT / "san_det"):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                text = open(path, encoding="utf-8").read()
                if "import pytest" in text or "tmp_path" in text or "tests.helpers" in text:
                    offenders.append(path)
    assert offenders == []
    assert not (REPO_ROOT / "san_det" / "engine" / "testing.py").exists()
