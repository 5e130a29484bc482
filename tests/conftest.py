import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def tiny():
    from compactor.models.tiny import tiny_model

    return tiny_model("llama")


@pytest.fixture
def tok():
    from compactor.models.tiny import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture
def tiny_dir(tmp_path, tiny, tok):
    """A tiny Llama saved as a transformers directory."""
    d = tmp_path / "tiny-llama"
    tiny.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture
def text_file(tmp_path):
    """A small English text file (enough for a few 64-token windows of the byte tokenizer)."""
    p = tmp_path / "text.txt"
    body = "\n".join(
        f"Line {i}: It is a truth universally acknowledged, that a single man in possession "
        f"of a good fortune, must be in want of a wife." for i in range(40)
    )
    p.write_text(body)
    return p
