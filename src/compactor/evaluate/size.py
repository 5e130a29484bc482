"""Storage size and parameter counts of in-memory models.

A module that stores compressed weights (packed integer codes + scales) reports its own
storage through a ``storage_nbytes()`` method and its logical weight count through
``logical_numel()``; its parameters and buffers are then not counted again.
"""

from __future__ import annotations

import torch


def _unique_tensors(module: torch.nn.Module):
    seen = set()
    for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
        if t is None or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        yield t


def model_size(model: torch.nn.Module) -> tuple[int, int]:
    """(storage bytes, parameter count) of a model; tied tensors counted once.

    Persistent buffers count toward bytes (they are saved); non-persistent buffers such as
    rotary tables do not.
    """
    nbytes, numel = 0, 0
    seen: set[int] = set()
    for mod in model.modules():
        if hasattr(mod, "storage_nbytes"):
            nbytes += int(mod.storage_nbytes())
            numel += int(mod.logical_numel())
            for t in mod.parameters(recurse=False):
                seen.add(t.data_ptr())
            continue
        nonpersistent = getattr(mod, "_non_persistent_buffers_set", set())
        for name, t in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            if t is None or t.data_ptr() in seen or name in nonpersistent:
                continue
            seen.add(t.data_ptr())
            nbytes += t.numel() * t.element_size()
            if isinstance(t, torch.nn.Parameter):
                numel += t.numel()
    return nbytes, numel
