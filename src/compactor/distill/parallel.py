"""More than one process: DDP (every process holds the whole student) or FSDP (parameters,
gradients and optimizer state sharded across processes, for students too big to replicate).

Both run on CPU with the gloo backend under ``torchrun``. The trainer talks to a
:class:`Parallel` object, so the loop reads the same for one process, DDP and FSDP.
"""

from __future__ import annotations

import contextlib

import torch

from compactor.distributed import dist_info  # noqa: F401  (re-exported for the trainer)


class Parallel:
    """Wraps the trainable module for ``strategy`` (``ddp`` or ``fsdp``) when ``world > 1``."""

    def __init__(self, net: torch.nn.Module, strategy: str, world: int, rank: int, layers=None):
        self.net, self.strategy, self.world, self.rank = net, strategy, world, rank
        self.wrapped = net
        if world > 1 and strategy == "ddp":
            self.wrapped = torch.nn.parallel.DistributedDataParallel(net)
        elif world > 1 and strategy == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for layer in layers or []:  # one all-gather unit per decoder layer
                fully_shard(layer)
            fully_shard(net)

    @property
    def sharded(self) -> bool:
        return self.world > 1 and self.strategy == "fsdp"

    @property
    def collective_io(self) -> bool:
        """Must every process take part in saving, loading and evaluating?"""
        return self.sharded

    def sync_context(self, last: bool):
        """Gradient synchronisation only on the last micro-batch of an optimizer step."""
        if self.world == 1:
            return contextlib.nullcontext()
        if self.strategy == "ddp":
            return contextlib.nullcontext() if last else self.wrapped.no_sync()
        self.net.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def full_state(self, opt) -> tuple[dict, dict]:
        """(model, optimizer) state with whole tensors on CPU (collective under FSDP; the
        result is complete on rank 0)."""
        if not self.sharded:
            return self.net.state_dict(), opt.state_dict()
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        o = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(self.net, options=o), get_optimizer_state_dict(self.net, opt, options=o)

    def load_full_state(self, model_sd: dict, opt, opt_sd: dict) -> None:
        """Load whole-tensor states (read by every process) into the possibly sharded module."""
        if not self.sharded:
            self.net.load_state_dict(model_sd)
            opt.load_state_dict(opt_sd)
            return
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        o = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.net, model_sd, options=o)
        set_optimizer_state_dict(self.net, opt, opt_sd, options=o)

    def plain_model(self, model):
        """The trained student as an ordinary (unsharded) transformers model on every process."""
        if not self.sharded:
            return model
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        from transformers import AutoModelForCausalLM

        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        fresh = AutoModelForCausalLM.from_config(model.config, dtype=next(iter(sd.values())).dtype)
        fresh.load_state_dict(sd)
        return fresh.eval()
