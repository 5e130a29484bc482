"""Where text comes from: a bundled corpus split or user files, always with provenance."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from compactor.errors import CompactorError

USER_SUFFIXES = (".txt", ".jsonl", ".parquet")


@dataclass
class Text:
    """A body of text and where it came from (source, files, hashes)."""

    text: str
    provenance: dict = field(default_factory=dict)


def _read_jsonl(path: Path) -> list[str]:
    docs = []
    try:
        lines = path.read_bytes().decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise CompactorError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CompactorError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise CompactorError(f"{path}:{lineno}: each line needs a string field 'text'")
        docs.append(row["text"])
    return docs


def _read_parquet(path: Path) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise CompactorError(
            f"reading {path} needs pyarrow: pip install 'compactor[parquet]'"
        ) from None
    try:
        names = pq.read_schema(path).names
        if "text" not in names:
            raise CompactorError(f"{path}: parquet file has no 'text' column (it has: {', '.join(names) or 'none'})")
        table = pq.read_table(path, columns=["text"])
    except CompactorError:
        raise
    except Exception as exc:  # pyarrow raises assorted types on damaged files
        raise CompactorError(f"{path}: not a readable parquet file ({' '.join(str(exc).split())})") from None
    return [t for t in table.column("text").to_pylist() if isinstance(t, str)]


def _read_file(path: Path) -> list[str]:
    if path.suffix == ".txt":
        try:
            return [path.read_text(encoding="utf-8")]
        except UnicodeDecodeError as exc:
            raise CompactorError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    if path.suffix == ".parquet":
        return _read_parquet(path)
    raise CompactorError(
        f"{path}: unsupported text file type {path.suffix!r} (use {', '.join(USER_SUFFIXES)})"
    )


def digest(parts: list[str]) -> str:
    """sha256 of the concatenated UTF-8 parts (how every text's provenance is hashed)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode("utf-8"))
    return h.hexdigest()


def load_user_text(path: str | Path) -> Text:
    """Text from a .txt / .jsonl / .parquet file or a directory of them (sorted, recursive)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CompactorError(f"text not found: {path}")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in USER_SUFFIXES and p.is_file())
        if not files:
            raise CompactorError(f"directory {path} has no {'/'.join(USER_SUFFIXES)} files")
    else:
        files = [path]
    docs, per_file = [], []
    for f in files:
        file_docs = [d for d in _read_file(f) if d.strip()]
        docs.extend(file_docs)
        per_file.append({"file": str(f.resolve()), "sha256": digest(file_docs), "docs": len(file_docs)})
    if not docs:
        raise CompactorError(f"{path} contains no text")
    text = "\n\n".join(docs)
    return Text(text, {"source": "user", "path": str(path.resolve()), "files": per_file,
                       "sha256": digest([text])})


def load_corpus(name: str, split: str) -> Text:
    """A bundled corpus split, e.g. ``("austen", "eval")`` or a single novel."""
    if name != "austen":
        raise CompactorError(f"unknown corpus {name!r}; known: austen, prose, chat, code, tech, c, "
                             "calib:mix (or give a file path)")
    from compactor.data import austen

    if split in austen.SPLITS:
        novels = austen.SPLITS[split]
    elif split in austen.NOVELS:
        novels = (split,)
    else:
        raise CompactorError(
            f"unknown split {split!r} of austen; use one of "
            f"{', '.join(list(austen.SPLITS) + list(austen.NOVELS))}"
        )
    root = austen.austen_dir()
    man = austen.manifest()
    texts = [(root / f"{n}.txt").read_text(encoding="utf-8") for n in novels]
    text = "\n\n".join(texts)
    return Text(text, {
        "source": "austen",
        "package": man["package"],
        "version": man["version"],
        "deb_sha256": man["deb_sha256"],
        "split": split,
        "novels": [austen.NOVELS[n] for n in novels],
        "files": [{"file": str(root / f"{n}.txt"), "sha256": man["files_sha256"][n]} for n in novels],
        "sha256": digest([text]),
    })


def load_text(spec: str | Path, tokenizer=None, max_chars: int | None = None) -> Text:
    """``"austen:eval"``-style corpus splits, domain splits (``code:eval``, ``tech:calib``,
    ``chat:calib``, ``c:eval``, ``prose:eval`` = ``austen:eval``; see
    :mod:`compactor.data.domains`), or a path to user text.

    ``tokenizer``: renders chat turns with its chat template; ``max_chars``: domain splits
    stop adding files once they hold this many characters (corpora and user files are
    always read whole)."""
    s = str(spec)
    if ":" in s and not Path(s).exists():
        name, split = s.split(":", 1)
        from compactor.data import domains

        if name == "prose":
            name = "austen"
        if domains.is_domain(name):
            return domains.load_domain(name, split, tokenizer, max_chars)
        return load_corpus(name, split)
    if s == "austen":
        return load_corpus("austen", "eval")
    return load_user_text(s)
