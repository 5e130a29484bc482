import pytest
import torch

from compactor.primitives.threads import one_thread


def test_one_thread_restores_the_count_even_on_error():
    before = torch.get_num_threads()
    with one_thread():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError):
        with one_thread():
            raise RuntimeError("boom")
    assert torch.get_num_threads() == before
