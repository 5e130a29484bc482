"""Evaluating a model that does not fit in memory: layer by layer over all windows.

:class:`StreamedBackend` runs the embedding on every evaluation window, then each decoder
layer in turn over all of them (the layer read from disk, used, released), then the final
norm and head window by window — so the model is never in memory whole, and two large models
are never in memory together: the reference's logits go to an on-disk cache
(:class:`compactor.evaluate.backends.CachedBackend` with a ``directory``) before the
candidate runs. The metrics are the harness's, unchanged.
"""

from __future__ import annotations

from typing import Iterator

import torch

from compactor.evaluate.backends import head_logits
from compactor.models.adapters import decoder_layers
from compactor.models.load import LoadedModel


class StreamedBackend:
    """A streamed :class:`LoadedModel` as an evaluation backend (``iter_chunks``)."""

    kind = "torch (streamed)"

    def __init__(self, loaded: LoadedModel, name: str | None = None, batch: int = 4):
        self.loaded = loaded
        self.name = name or loaded.source
        self.load_seconds = loaded.load_seconds
        self.batch = batch
        self.size_bytes, self.params = streamed_size(loaded)
        self.vocab_size = loaded.model.config.vocab_size

    @torch.inference_mode()
    def iter_chunks(self, input_ids: torch.Tensor, rows: int) -> Iterator[tuple[int, int, torch.Tensor]]:
        """``input_ids [N, L]`` -> ``(window, first row, float32 logits [<= rows, V])`` in
        order: every layer runs over all windows first, then the head ``rows`` positions at
        a time."""
        from compactor.calibration.activations import Activations
        from compactor.calibration.sequential import _capture_layer0, _out
        from compactor.data.windows import TokenWindows

        lm, a = self.loaded, self.loaded.adapter
        model, store = lm.model, lm.store
        layers = decoder_layers(model, a)
        win = TokenWindows(input_ids, torch.ones_like(input_ids, dtype=torch.bool))
        captured = Activations()
        with store.parts(model, [a.embed], a):
            _capture_layer0(model, layers, win, self.batch, torch.float32, captured)
        states = list(captured)
        del captured
        for i in range(len(layers)):
            layer = store.layer(model, i, a)
            states = [(_out(layer(h, **kw)), kw) for h, kw in states]
            del layer
            store.done(model, i, a)
        with store.parts(model, [a.final_norm, a.lm_head, a.embed], a):
            norm, head = model.get_submodule(a.final_norm), model.get_submodule(a.lm_head)
            softcap = getattr(model.config, "final_logit_softcapping", None)
            w = 0
            for h, _ in states:  # [B, L, H] per batch of windows
                for hb in h:
                    for s in range(0, hb.shape[0], rows):
                        yield w, s, head_logits(head, norm(hb[s : s + rows]), softcap)
                    w += 1

    def window_logits(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.cat([c for _, _, c in self.iter_chunks(ids[None], 1 << 20)])

    def speed(self, *args, **kwargs) -> dict:
        return {}  # a streamed model reads its weights from disk: its speed is not a runtime's


def streamed_size(loaded: LoadedModel) -> tuple[int, int]:
    """(storage bytes, parameter count) of a streamed model, from its checkpoints: codes at
    their grid's bits per weight, other tensors at their stored size; tied tensors once."""
    from compactor.quant.storage import read_manifest

    store, a, model = loaded.store, loaded.adapter, loaded.model
    nbytes = numel = 0
    tied = {f"{a.lm_head}.weight"} if store.tied else set()
    coded = {}
    for d in {*store.source, store.input.directory}:
        coded.update(read_manifest(d))
    for name, p in model.named_parameters(remove_duplicate=False):
        if name in tied:
            continue
        numel += p.numel()
        module = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and module in coded:
            nbytes += int(round(p.numel() * coded[module]["bits_per_weight"] / 8))
        else:
            nbytes += store.input.nbytes(name) if name in store.input else p.numel() * 4
    return nbytes, numel
