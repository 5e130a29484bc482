"""A bounded fuzz run in every `make test` (more cases: bench/fuzz.py)."""

import pytest

from tests.fuzz.targets import TARGETS, run_all


@pytest.mark.parametrize("target", list(TARGETS))
def test_bad_inputs_end_in_one_line_errors(tmp_path, target):
    report = run_all(tmp_path, cases=12, seed=1, targets=[target])
    assert report.outcomes
    assert not report.failures, "\n".join(f"{o.mutation}: {o.result} {o.message}" for o in report.failures)
