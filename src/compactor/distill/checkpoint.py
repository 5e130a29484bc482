"""Training-state checkpoints and the seeded example order, shared by every trainer.

A checkpoint directory holds the model (``student.safetensors``), the optimizer, scheduler
and RNG state (``optim.pt``, read back with ``weights_only=True``) and ``state.json`` with the
step and the run's fingerprint; it is written atomically, so a crash leaves the previous one.

The order: the examples of epoch e are a permutation seeded by (seed, e) and step k takes
positions ``k·batch .. (k+1)·batch`` of the concatenated epochs, so a resumed run needs only
the step number to repeat the uninterrupted one exactly.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from compactor.errors import CompactorError
from compactor.io import atomic_dir


def step_indices(n: int, batch: int, step: int, seed: int) -> torch.Tensor:
    """Example indices ``[batch]`` of ``step`` over ``n`` examples (epoch permutations)."""
    pos = torch.arange(step * batch, (step + 1) * batch)
    out = torch.empty(batch, dtype=torch.long)
    for e in pos.div(n, rounding_mode="floor").unique().tolist():
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + e))
        sel = pos // n == e
        out[sel] = perm[pos[sel] % n]
    return out


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.exists():
        return []
    return sorted(p for p in root.glob("step_*") if (p / "state.json").exists())


def write_checkpoint(root: Path, step: int, model_sd: dict, opt_sd: dict, sched, fingerprint: str,
                     total_steps: int, keep: int) -> None:
    """Write ``root/step_<step>`` and drop all but the newest ``keep``."""
    from safetensors.torch import save_file

    with atomic_dir(root / f"step_{step:07d}", overwrite=True) as tmp:
        # Tied weights share storage; safetensors wants one tensor per name, so clone.
        save_file({k: v.detach().clone().contiguous() for k, v in model_sd.items()}, str(tmp / "student.safetensors"))
        torch.save({"optimizer": opt_sd, "scheduler": sched.state_dict(), "rng": torch.get_rng_state()},
                   tmp / "optim.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, "fingerprint": fingerprint,
                                                     "total_steps": total_steps}))
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def read_checkpoint(path: Path, fingerprint: str) -> tuple[int, dict, dict]:
    """(step, model state, extra state with optimizer / scheduler / rng) of ``path``; refuses
    a checkpoint of another run by name."""
    from safetensors.torch import load_file

    state = json.loads((path / "state.json").read_text())
    if state.get("fingerprint") != fingerprint:
        raise CompactorError(f"{path}: checkpoint belongs to another run (different student, teacher, data "
                             "or settings); use another --out or start over with --force")
    extra = torch.load(path / "optim.pt", weights_only=True)
    return state["step"], load_file(str(path / "student.safetensors")), extra
