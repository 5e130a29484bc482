"""Memory sizes as people write them ("8GB", "512MiB"), and the memory this process may use."""

from __future__ import annotations

import re

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str | int) -> int:
    """``"8GB"`` -> 8e9 bytes, ``"6GiB"`` -> 6·2^30; a plain number is bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"{text!r} is not a memory size (e.g. 8GB, 512MB, 6GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def available_bytes() -> int:
    """Memory available to a new allocation now (psutil's ``available``)."""
    import psutil

    return int(psutil.virtual_memory().available)


def fmt_bytes(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"
