"""Forward hooks that are always removed, and an exception to stop a forward pass early."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from torch import nn


class StopForward(Exception):
    """Raised from a hook once everything needed has been captured."""


@contextlib.contextmanager
def input_hooks(modules: dict[str, nn.Module], fn: Callable[[str, object], None],
                stop_after: str | None = None) -> Iterator[None]:
    """Call ``fn(name, input_tensor)`` before each module runs; if ``stop_after`` is given,
    raise :class:`StopForward` right after that module's input was seen (its own compute
    and everything after it are skipped). Hooks are removed on exit, whatever happens."""
    handles = []
    try:
        for name, mod in modules.items():
            def hook(_m, args, _name=name):
                fn(_name, args[0])
                if _name == stop_after:
                    raise StopForward
            handles.append(mod.register_forward_pre_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def replay_attention(layer: nn.Module, o_proj: str, cached: list) -> Iterator[None]:
    """Make ``layer``'s attention block skip its computation and return ``o_proj(x_i)`` for
    the cached o_proj inputs ``x_i``, one per call in order.

    Valid once the q/k/v projections are final: the attention output before o_proj then no
    longer changes, so later calibration passes over the layer need not recompute it (on a
    small model attention is a large part of a layer's forward cost). The block's output
    follows transformers' ``(output, attention weights)`` convention.
    """
    attn = layer.get_submodule(o_proj.rsplit(".", 1)[0])
    calls = iter(cached)

    def forward(*_args, **_kwargs):
        return layer.get_submodule(o_proj)(next(calls)), None

    attn.forward = forward  # an instance attribute shadows the class's forward
    try:
        yield
    finally:
        del attn.forward
