"""The two test tiers: ``make test`` runs the tests not marked ``slow``, ``make test-all`` (and
CI) every test; a test that starts train_net.py in a child process fails unless marked slow."""

import re
import subprocess
import textwrap

from tests.conftest import UNGUARDED_POPEN
from tests.helpers.paths import REPO_ROOT


def _recipe(target: str) -> list:
    """The command lines of a Makefile target."""
    text = (REPO_ROOT / "Makefile").read_text()
    body = re.search(rf"^{re.escape(target)}:.*\n((?:\t.*\n)*)", text, re.MULTILINE)
    assert body, f"no target {target} in the Makefile"
    return [line.strip() for line in body.group(1).splitlines()]


def test_make_test_leaves_out_the_slow_tests_and_ci_runs_them_all():
    assert _recipe("test") == ['$(PY) -m pytest -q -m "not slow" tests']
    assert _recipe("test-all") == ["$(PY) -m pytest -q tests"]
    ci = (REPO_ROOT / ".ci/run").read_text().splitlines()
    assert [line for line in ci if line.startswith("make")] == ["make test-all"]


def test_an_unmarked_test_that_runs_train_net_in_a_child_process_fails(pytester, monkeypatch):
    monkeypatch.setattr(subprocess, "Popen", UNGUARDED_POPEN)  # the inner run's guard is tested
    pytester.makeini("[pytest]\nmarkers =\n    slow: slow by nature\n")
    pytester.makeconftest("from tests.conftest import _script_runs_are_marked_slow  # noqa\n")
    pytester.makepyfile(test_runs=textwrap.dedent("""
            import subprocess, sys

            import pytest

            def run(script):
                subprocess.run([sys.executable, "-c", "pass", script], check=True)

            def test_unmarked():
                run("tools/../train_net.py")

            @pytest.mark.slow
            def test_marked():
                run("tools/../train_net.py")

            def test_another_script():
                run("my_train_net.py")
            """))
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(
        ["*test_runs.py::test_unmarked runs train_net.py in a child process: mark it *slow*"]
    )
