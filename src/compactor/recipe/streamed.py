"""Where a step on a streamed model writes the layers it finishes, and how it resumes.

Each step gets a checkpoint directory in the run's work directory. After every layer the
layer is written, the shards flushed, a loadable partial checkpoint (index, manifest) and
``progress.json`` (the layers done, the writers' state) replaced atomically — so a run
killed at any moment resumes with ``--resume`` from the last finished layer: the finished
layers are read back from the checkpoint and only propagate the calibration activations,
and the output ends byte-identical to an uninterrupted run's.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

PROGRESS = "progress.json"


@dataclass
class StepOutput:
    """``sink(i, layer)`` for the walkers, ``commit()`` at the step's end, and the first
    layer still to do (0 unless resuming). In-memory models get a no-op."""

    sink: Callable | None = None
    commit: Callable[[], None] = lambda: None
    resume_from: int = 0
    directory: Path | None = None
    done: list[int] = field(default_factory=list)

    @classmethod
    def open(cls, ctx, step: str, cfg=None) -> "StepOutput":
        loaded = ctx.loaded
        if not loaded.streamed:
            return cls()
        from compactor.distributed import barrier, dist_info
        from compactor.models.adapters import decoder_layers
        from compactor.quant.storage import ModelWriter

        d = ctx.work_dir / f"step{len(ctx.log):02d}-{step}"
        if dist_info()[0] != 0:
            # Under torchrun rank 0 writes the step's layers; the others compute the same
            # layers alongside and read rank 0's checkpoint once it is complete.
            n = len(decoder_layers(loaded.model, loaded.adapter))

            def follow() -> None:
                barrier()
                for i in range(n):
                    loaded.store.moved(i, d)

            return cls(commit=follow, directory=d)
        writer = ModelWriter(d, weight_dtype=loaded.store.input_dtype)
        out = cls(directory=d)
        ctx.streamed_notes, ctx.streamed_sparsity = [], []
        progress = d / PROGRESS
        if ctx.resume and progress.exists():
            state = json.loads(progress.read_text())
            writer.restore(state["writer"])
            writer.checkpoint()  # the on-disk index and manifest as of the last finished layer
            out.done = list(state["done"])
            ctx.streamed_notes = list(state["notes"])
            ctx.streamed_sparsity = [_row(r) for r in state["sparsity"]]
            out.resume_from = len(out.done)
            for i in out.done:  # finished layers are read back from the checkpoint
                loaded.store.moved(i, d)
        pruning = cfg is not None and hasattr(cfg, "target_sparsity")

        def sink(i: int, layer) -> None:
            prefix = f"{loaded.adapter.layers}.{i}."
            ctx.streamed_notes += [m.note for m in layer.modules() if getattr(m, "note", None)]
            if pruning:  # checked here, while the layer is in memory
                from compactor.prune.stats import check_pruned, sparsity_report
                from compactor.targeting import match_modules

                local = list(match_modules(layer, cfg.targets, cfg.ignore))
                check_pruned(layer, local, cfg)
                ctx.streamed_sparsity += [dataclasses.replace(r, name=prefix + r.name)
                                          for r in sparsity_report(layer, local)]
            writer.add(layer, prefix=prefix)
            out.done.append(i)
            state = {"done": out.done, "writer": writer.checkpoint(), "notes": ctx.streamed_notes,
                     "sparsity": [dataclasses.asdict(r) for r in ctx.streamed_sparsity]}
            tmp = progress.with_suffix(".tmp")
            tmp.write_text(json.dumps(state))
            tmp.replace(progress)  # the layer counts as done only once this lands

        def commit() -> None:
            writer.close(loaded.model.config)
            for i in out.done:
                loaded.store.moved(i, d)
            barrier()  # the other processes may read the checkpoint now

        out.sink, out.commit = sink, commit
        return out


def _row(r: dict) -> Any:
    from compactor.prune.stats import LayerSparsity

    return LayerSparsity(**{**r, "shape": tuple(r["shape"])})
