"""Text domains beyond prose, from Debian packages, with fixed calibration / evaluation
splits that never overlap and recorded provenance.

=========  ===================================================  ==============================
domain     calib split                                          eval split
=========  ===================================================  ==============================
prose      Austen, Sense and Sensibility (``austen:calib``)     Austen, Persuasion
chat       Debian FAQ, chapters 1-9 as user/assistant turns     Debian FAQ, chapters 10-15
code       Python standard library modules (libpython3.11-      the other modules (1 in 8,
           stdlib), 7 in 8 by a hash of the module path         by the same hash)
tech       the Debian Reference manual (debian-reference-en)    the GNU Coding Standards and
                                                                Maintainers' guide
c          (never calibrated on)                                Linux UAPI C headers
=========  ===================================================  ==============================

Files are taken in the order of the sha256 of their path (a fixed shuffle, so the first
tokens of a split already span many modules). ``calib:mix`` balances the four calibration
splits by tokens (see :func:`compactor.data.windows.windows_for`). ``python3.*-doc`` and
``r-cran-tokenizers`` are reserved for independent checks and never used here.

Chat turns are rendered with the tokenizer's own chat template when it has one (that is
what a chat deployment feeds the model), else as ``User: ...`` / ``Assistant: ...`` lines;
the provenance says which.
"""

from __future__ import annotations

import gzip
import hashlib
import re
from pathlib import Path

from compactor.errors import CompactorError

#: The domains of ``calib:mix``, in the order their windows interleave.
MIX = ("prose", "chat", "code", "tech")
#: The evaluation domains scored by ``--eval-data domains`` (``c`` is never calibrated on).
EVAL_DOMAINS = ("austen:eval", "code:eval", "tech:eval", "c:eval")

_SPLITS = {
    "chat": ("calib", "eval"),
    "code": ("calib", "eval"),
    "tech": ("calib", "eval"),
    "c": ("eval",),
}

#: Paths under the stdlib that are not library code people write (test suites, data).
_CODE_SKIP = re.compile(r"/(test|tests|idle_test|site-packages|dist-packages|config-[^/]*)/")


def _path_order(paths: list[str]) -> list[str]:
    return sorted(paths, key=lambda p: hashlib.sha256(p.encode()).hexdigest())


def _bucket(rel: str) -> int:
    return int(hashlib.sha256(rel.encode()).hexdigest()[:8], 16) % 8


def _take(files: list[tuple[str, str]], max_chars: int | None) -> list[tuple[str, str]]:
    """A prefix of ``files`` ((name, text) pairs) holding at least ``max_chars`` characters."""
    out, n = [], 0
    for name, text in files:
        if max_chars is not None and n >= max_chars:
            break
        out.append((name, text))
        n += len(text)
    return out


def _code(split: str, max_chars: int | None):
    from compactor.data.debian import debian_package

    root, man = debian_package("libpython3.11-stdlib")
    lib = root / "usr/lib/python3.11"
    # Links are skipped: the package ships some pointing outside it (sysconfig data).
    rels = [str(p.relative_to(lib)) for p in lib.rglob("*.py")
            if not p.is_symlink() and not _CODE_SKIP.search("/" + str(p.relative_to(lib)))]
    want_eval = split == "eval"
    rels = [r for r in _path_order(rels) if (_bucket(r) == 0) == want_eval]
    files = _take([(r, (lib / r).read_text(encoding="utf-8", errors="replace")) for r in rels], max_chars)
    rule = "modules whose sha256(path) % 8 == 0" if want_eval else "modules whose sha256(path) % 8 != 0"
    return files, man, rule


def _headers(split: str, max_chars: int | None):
    from compactor.data.debian import debian_package

    root, man = debian_package("linux-libc-dev")
    inc = root / "usr/include"
    rels = _path_order([str(p.relative_to(inc)) for p in inc.rglob("*.h") if not p.is_symlink()])
    files = _take([(r, (inc / r).read_text(encoding="utf-8", errors="replace")) for r in rels], max_chars)
    return files, man, "all UAPI headers (evaluation only)"


def _gz(path: Path) -> str:
    return gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace")


def _tech(split: str, max_chars: int | None):
    from compactor.data.debian import debian_package

    if split == "calib":
        root, man = debian_package("debian-reference-en")
        name = "usr/share/debian-reference/debian-reference.en.txt.gz"
        return [(name, _gz(root / name))], man, "the whole manual"
    root, man = debian_package("gnu-standards")
    names = ["usr/share/doc/gnu-standards/standards.text.gz",
             "usr/share/doc/gnu-standards/maintain.text.gz"]
    return [(n, _gz(root / n)) for n in names], man, "both texts"


_QUESTION = re.compile(r"^(\d+)\.(\d+)\. (\S.*)$")


def faq_exchanges(text: str) -> list[tuple[int, str, str]]:
    """(chapter, question, answer) for every numbered question of the Debian FAQ's plain
    text: a question starts at column 0 (``2.1. What ...``), may wrap until a blank line,
    and its answer is the indented paragraphs up to the next heading, re-flowed."""
    out, lines, i = [], text.replace("\xa0", " ").splitlines(), 0
    while i < len(lines):
        m = _QUESTION.match(lines[i])
        if not m:
            i += 1
            continue
        chapter, q = int(m.group(1)), [m.group(3)]
        i += 1
        while i < len(lines) and lines[i].strip() and not lines[i].startswith(" "):
            q.append(lines[i].strip())
            i += 1
        paras, cur = [], []
        while i < len(lines) and (not lines[i].strip() or lines[i].startswith(" ")):
            if lines[i].strip():
                cur.append(lines[i].strip())
            elif cur:
                paras.append(" ".join(cur))
                cur = []
            i += 1
        if cur:
            paras.append(" ".join(cur))
        if paras:  # the table of contents lists questions without answers
            out.append((chapter, " ".join(q), "\n\n".join(paras)))
    return out


def render_chat(exchanges: list[tuple[str, str]], tokenizer=None) -> tuple[list[str], str]:
    """Each (question, answer) as one conversation; the rendering used."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        docs = [tokenizer.apply_chat_template(
            [{"role": "user", "content": q}, {"role": "assistant", "content": a}], tokenize=False)
            for q, a in exchanges]
        return docs, "tokenizer chat template"
    return [f"User: {q}\nAssistant: {a}\n" for q, a in exchanges], "plain 'User:'/'Assistant:' lines"


def _chat(split: str, max_chars: int | None, tokenizer=None):
    from compactor.data.debian import debian_package

    root, man = debian_package("debian-faq")
    name = "usr/share/doc/debian/FAQ/debian-faq.en.txt.gz"
    ex = faq_exchanges(_gz(root / name))
    keep = [i for i, (ch, _, _) in enumerate(ex) if (ch <= 9) == (split == "calib")]
    docs, how = render_chat([ex[i][1:] for i in keep], tokenizer)
    # Named by the question's place in the whole FAQ, so the two splits never share a name.
    files = _take([(f"{name}#q{i}", d) for i, d in zip(keep, docs)], max_chars)
    rule = ("questions of chapters 1-9" if split == "calib" else "questions of chapters 10-15") + f"; {how}"
    return files, man, rule


_LOADERS = {"code": _code, "tech": _tech, "chat": _chat, "c": _headers}


def is_domain(name: str) -> bool:
    return name in _LOADERS


def load_domain(name: str, split: str, tokenizer=None, max_chars: int | None = None):
    """The text of one domain split as a :class:`~compactor.data.sources.Text`."""
    from compactor.data.sources import Text, digest

    if split not in _SPLITS[name]:
        raise CompactorError(f"unknown split {split!r} of domain {name}; use one of "
                             f"{', '.join(_SPLITS[name])}")
    loader = _LOADERS[name]
    files, man, rule = (loader(split, max_chars, tokenizer) if name == "chat"
                        else loader(split, max_chars))
    docs = [t for _, t in files if t.strip()]
    if not docs:
        raise CompactorError(f"domain {name}:{split} has no text in {man['package']} {man['version']}")
    text = "\n\n".join(docs)
    return Text(text, {
        "source": "debian", "domain": name, "split": split, "package": man["package"],
        "version": man["version"], "deb_sha256": man["deb_sha256"], "rule": rule,
        "files": len(files), "first_files": [n for n, _ in files[:5]],
        "max_chars": max_chars, "sha256": digest([text]),
    })
