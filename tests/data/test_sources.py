import json

import pytest

from compactor.data.austen import join_lines
from compactor.data.sources import load_text
from compactor.errors import CompactorError


def test_txt_jsonl_parquet_and_directory(tmp_path):
    (tmp_path / "a.txt").write_text("alpha text")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "beta"}) + "\n\n" + json.dumps({"text": "gamma"}) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["delta", "epsilon"]}), tmp_path / "c.parquet")
    (tmp_path / "ignored.csv").write_text("x")
    t = load_text(tmp_path)
    assert t.text == "alpha text\n\nbeta\n\ngamma\n\ndelta\n\nepsilon"
    assert [f["docs"] for f in t.provenance["files"]] == [1, 2, 2]
    assert load_text(tmp_path / "b.jsonl").text == "beta\n\ngamma"


@pytest.mark.parametrize("content,match", [
    ("", "contains no text"),
    ("   \n\n", "contains no text"),
])
def test_empty_text_refused(tmp_path, content, match):
    p = tmp_path / "empty.txt"
    p.write_text(content)
    with pytest.raises(CompactorError, match=match):
        load_text(p)


def test_bad_inputs(tmp_path):
    with pytest.raises(CompactorError, match="text not found"):
        load_text(tmp_path / "missing.txt")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(CompactorError, match=r"bad.jsonl:2: .*'text'"):
        load_text(bad)
    notjson = tmp_path / "x.jsonl"
    notjson.write_text("{oops\n")
    with pytest.raises(CompactorError, match=r"x.jsonl:1: not valid JSON"):
        load_text(notjson)
    (tmp_path / "d").mkdir()
    with pytest.raises(CompactorError, match="has no"):
        load_text(tmp_path / "d")
    with pytest.raises(CompactorError, match="unknown split"):
        load_text("austen:nosuchnovel")
    with pytest.raises(CompactorError, match="unknown corpus"):
        load_text("tolstoy:eval")


def test_join_lines_keeps_print_layout():
    assert join_lines(["CHAPTER I", "", "It is a truth", "universally acknowledged"]) == \
        "CHAPTER I\n\nIt is a truth\nuniversally acknowledged\n"
