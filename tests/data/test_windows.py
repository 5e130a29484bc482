import pytest
import torch

from compactor.data.windows import make_windows, windows_for
from compactor.errors import CompactorError


def test_non_overlapping_windows_are_plain_slices():
    ids = list(range(1000))
    w = make_windows(ids, length=100)
    assert w.input_ids.shape == (10, 100)
    assert torch.equal(w.input_ids.flatten(), torch.arange(1000))
    # Position 0 is context only; 1..99 scored.
    assert w.n_scored == 10 * 99 and not w.score_mask[:, 0].any()
    assert w.provenance["token_range"] == [0, 1000]


def test_overlapping_windows_score_each_token_once():
    ids = list(range(1000))
    w = make_windows(ids, length=100, stride=25)
    scored = []
    for row, mask in zip(w.input_ids, w.score_mask):
        scored += row[mask].tolist()
    # Every stream token after the first, up to the last window's end, exactly once.
    end = w.provenance["token_range"][1]
    assert scored == list(range(1, end))


def test_bos_prepend_and_max_tokens():
    w = make_windows(list(range(500)), length=50, bos="prepend", bos_id=7, max_tokens=200)
    assert len(w) == 4 and (w.input_ids[:, 0] == 7).all()
    assert w.input_ids[0, 1:].tolist() == list(range(49))
    assert not w.score_mask[:, :1].any() and w.score_mask[:, 1:].all()


def test_bad_window_settings():
    with pytest.raises(CompactorError, match="fewer than one window"):
        make_windows(list(range(10)), length=64)
    with pytest.raises(CompactorError, match="stride"):
        make_windows(list(range(100)), length=10, stride=11)
    with pytest.raises(CompactorError, match="BOS"):
        make_windows(list(range(100)), length=10, bos="prepend", bos_id=None)


def test_windows_for_user_text(tok, text_file):
    w = windows_for(tok, str(text_file), length=64, max_tokens=256)
    assert w.input_ids.shape == (4, 64)
    p = w.provenance
    assert p["source"] == "user" and p["bos"] == "none" and p["window"] == 64
    assert p["files"][0]["file"].endswith("text.txt") and len(p["sha256"]) == 64
    assert tok.decode(w.input_ids[0]) == text_file.read_text()[:64]


def test_bos_policy_follows_the_tokenizer(tok, text_file):
    from tokenizers import processors

    from compactor.data.windows import resolve_bos, windows_for

    assert resolve_bos(tok, "auto") == "none"  # the byte tokenizer adds no BOS (like SmolLM2's)
    w = windows_for(tok, str(text_file), 64, max_tokens=128)
    assert w.provenance["bos"] == "none" and w.provenance["bos_policy"] == "auto"
    # A tokenizer that puts BOS first (as Gemma's do): auto prepends it to every window.
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 256)])
    assert tok("a")["input_ids"][0] == 256
    assert resolve_bos(tok, "auto") == "prepend" and resolve_bos(tok, "none") == "none"
    w = windows_for(tok, str(text_file), 64, max_tokens=128)
    assert w.provenance["bos"] == "prepend" and (w.input_ids[:, 0] == 256).all()
