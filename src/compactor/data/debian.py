"""Text that ships inside Debian packages, fetched once with ``apt-get download`` and
``dpkg-deb -x`` (never installed), with the package version and the .deb's sha256 recorded.

Every bundled corpus comes from here: the Austen novels, and the code / technical / chat
domains of :mod:`compactor.data.domains`. ``python3.*-doc`` and ``r-cran-tokenizers`` are
reserved for independent checks and refused by name, so no calibration, training or tuning
set can be built from them by accident.
"""

from __future__ import annotations

import fnmatch
import json
import subprocess
import tempfile
from pathlib import Path

from compactor.errors import CompactorError
from compactor.io import atomic_dir, home, sha256_file

#: Packages kept out of every calibration, training and tuning set (independent checks).
RESERVED = ("python3.*-doc", "python3-doc", "r-cran-tokenizers")

NO_SOURCE = (
    "pass your own text instead with --eval-data / --calib-data / --train-data FILE (.txt, .jsonl with a 'text' field, "
    ".parquet, or a directory of them)"
)


def _run(cmd: list[str], cwd: str | None = None, what: str = "") -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError:
        raise CompactorError(
            f"cannot fetch {what or 'a Debian package'}: {cmd[0]} is not available on this "
            "machine; " + NO_SOURCE
        ) from None


def check_not_reserved(package: str) -> None:
    """Refuse the packages reserved for independent checks."""
    if any(fnmatch.fnmatch(package, pat) for pat in RESERVED):
        raise CompactorError(
            f"Debian package {package!r} is reserved for independent checks and is never used "
            "for calibration, training or tuning"
        )


def download_deb(package: str, workdir: str, what: str = "") -> Path:
    """``apt-get download PACKAGE`` into ``workdir`` (running ``apt-get update`` once if the
    machine has no package lists yet); the path of the .deb."""
    check_not_reserved(package)
    what = what or f"Debian package {package}"
    proc = _run(["apt-get", "download", package], cwd=workdir, what=what)
    if proc.returncode != 0:
        _run(["apt-get", "update", "-qq"], what=what)  # a fresh machine may have no lists
        proc = _run(["apt-get", "download", package], cwd=workdir, what=what)
    debs = list(Path(workdir).glob(f"{package}_*.deb"))
    if proc.returncode != 0 or not debs:
        last = (proc.stderr.strip().splitlines() or ["apt-get failed"])[-1]
        raise CompactorError(
            f"cannot fetch {what} with `apt-get download {package}` (no apt or no network?): "
            f"{last}; " + NO_SOURCE
        )
    return debs[0]


def unpack_deb(deb: Path, dest: Path) -> None:
    proc = _run(["dpkg-deb", "-x", str(deb), str(dest)], what=deb.name)
    if proc.returncode != 0:
        raise CompactorError(f"dpkg-deb could not unpack {deb.name}: {proc.stderr.strip()}")


def debian_package(package: str) -> tuple[Path, dict]:
    """The unpacked tree of ``package`` (fetched once into the cache) and its manifest
    (package, version, .deb name and sha256)."""
    dest = home() / "data" / "debian" / package
    if (dest / "manifest.json").exists():
        return dest / "root", json.loads((dest / "manifest.json").read_text())
    with tempfile.TemporaryDirectory() as work:
        deb = download_deb(package, work)
        with atomic_dir(dest, overwrite=True) as tmp:
            unpack_deb(deb, tmp / "root")
            manifest = {"package": package, "version": deb.name.split("_")[1], "deb": deb.name,
                        "deb_sha256": sha256_file(deb)}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return dest / "root", manifest
