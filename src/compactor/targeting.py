"""Which modules a step applies to: class names or ``re:<regex>`` on qualified names."""

from __future__ import annotations

import re

from torch import nn


def _matches(name: str, module: nn.Module, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    return type(module).__name__ == pattern or name == pattern or name.endswith("." + pattern)


def match_modules(model: nn.Module, targets, ignore=()) -> list[str]:
    """Qualified names of modules matching any target and no ignore pattern, in order."""
    out = []
    for name, mod in model.named_modules():
        if not name:
            continue
        if any(_matches(name, mod, t) for t in targets) and not any(_matches(name, mod, i) for i in ignore):
            out.append(name)
    return out
