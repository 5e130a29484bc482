"""A bounded fuzz run in every `make test` (more cases: bench/fuzz.py)."""

import pytest

from tests.fuzz.targets import TARGETS, run_all


@pytest.mark.parametrize("target", list(TARGETS))
def test_bad_inputs_end_in_one_line_errors(tmp_path, target):
    # GGUF cases convert a model (~10 s each with its tokenizer): fewer of them here.
    report = run_all(tmp_path, cases=4 if target == "gguf" else 12, seed=1, targets=[target])
    assert report.outcomes
    assert not report.failures, "\n".join(f"{o.mutation}: {o.result} {o.message}" for o in report.failures)
