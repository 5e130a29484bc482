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
def replay_block(layer: nn.Module, consumer: str, cached: list, returns_tuple: bool) -> Iterator[None]:
    """Make the block holding ``consumer`` (``self_attn`` for ``self_attn.o_proj``) skip its
    computation and return ``consumer(x_i)`` for the cached consumer inputs ``x_i``, one
    per call in order.

    Valid once everything upstream of the consumer is final: its input then no longer
    changes, so later calibration passes over the layer need not recompute it (attention
    and the gate/up projections are most of a small model's forward cost). Attention
    blocks follow transformers' ``(output, attention weights)`` convention
    (``returns_tuple``); MLP blocks return the tensor.
    """
    block = layer.get_submodule(consumer.rsplit(".", 1)[0])
    calls = iter(cached)

    def forward(*_args, **_kwargs):
        out = layer.get_submodule(consumer)(next(calls))
        return (out, None) if returns_tuple else out

    block.forward = forward  # an instance attribute shadows the class's forward
    try:
        yield
    finally:
        del block.forward
