"""Jane Austen's six novels from Debian's ``r-cran-janeaustenr``, read without R.

The package stores the novels as an R lazy-load database (``data/Rdata.rdx`` index +
``Rdata.rdb`` zlib blobs). We fetch the .deb with ``apt-get download``, unpack it with
``dpkg-deb -x`` and decode each novel with the PyPI package ``rdata``.

Splits are by novel, so calibration, training and evaluation text never overlap:

============  ====================================================================
split         novels
============  ====================================================================
calib         Sense and Sensibility
train         Emma, Mansfield Park, Northanger Abbey, Pride and Prejudice
eval          Persuasion
============  ====================================================================

Each novel's lines are joined with newlines, as printed (hard wraps and blank lines kept).
"""

from __future__ import annotations

import json
import tempfile
import zlib
from pathlib import Path

from compactor.data.debian import download_deb, unpack_deb
from compactor.io import atomic_dir, home, sha256_file

PACKAGE = "r-cran-janeaustenr"
NOVELS = {
    "sensesensibility": "Sense and Sensibility",
    "prideprejudice": "Pride and Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}
SPLITS = {
    "calib": ("sensesensibility",),
    "train": ("emma", "mansfieldpark", "northangerabbey", "prideprejudice"),
    "eval": ("persuasion",),
}


def read_lazyload(rdx: Path, rdb: Path, name: str) -> list[str]:
    """Decode one character vector from an R lazy-load database (rdx index + rdb blobs)."""
    import warnings

    import rdata

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata warns that the blob has no file header
        index = rdata.read_rds(str(rdx))
        offset, length = (int(x) for x in index["variables"][name])
        with open(rdb, "rb") as f:
            f.seek(offset)
            blob = f.read(length)
        # Each blob: 4-byte big-endian uncompressed length, then a zlib stream.
        parsed = rdata.parser.parse_data(zlib.decompress(blob[4:]), expand_altrep=True)
        return [str(x) for x in rdata.conversion.convert(parsed)]


def join_lines(lines: list[str]) -> str:
    """The novel as printed: the package's lines joined by newlines (blank lines between
    paragraphs, hard wraps kept). This is the protocol behind our reference figure: the
    bundled model scores PPL 25.53 on the first 20,480 tokens of Pride and Prejudice."""
    return "\n".join(lines) + "\n"


def austen_dir() -> Path:
    """Directory with one ``<novel>.txt`` per novel and ``manifest.json``; fetched once."""
    dest = home() / "data" / "austen"
    if (dest / "manifest.json").exists():
        return dest
    with tempfile.TemporaryDirectory() as work:
        deb = download_deb(PACKAGE, work, what="the Austen corpus")
        unpack_deb(deb, Path(work) / "x")
        data = Path(work) / "x" / "usr/lib/R/site-library/janeaustenr/data"
        rdx, rdb = data / "Rdata.rdx", data / "Rdata.rdb"
        version = deb.name.split("_")[1]
        with atomic_dir(dest, overwrite=True) as tmp:
            files = {}
            for novel in NOVELS:
                text = join_lines(read_lazyload(rdx, rdb, novel))
                (tmp / f"{novel}.txt").write_text(text, encoding="utf-8")
                files[novel] = sha256_file(tmp / f"{novel}.txt")
            manifest = {
                "package": PACKAGE,
                "version": version,
                "deb": deb.name,
                "deb_sha256": sha256_file(deb),
                "rdb_sha256": sha256_file(rdb),
                "files_sha256": files,
            }
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return dest


def manifest() -> dict:
    return json.loads((austen_dir() / "manifest.json").read_text())
