"""san_det's test suite. A package, so that tests import shared code by a proper path
(``tests.helpers.<module>``) with the repository root on ``sys.path`` (``pythonpath`` in pytest.ini).
"""
