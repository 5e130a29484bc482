"""A deterministic tiny distillation run, executed as a separate process by the trainer tests
(to be killed with SIGKILL mid-run, or launched under torchrun).

    python tiny_run.py WORKDIR OUT.safetensors [--kill-at STEP] [--resume] [--micro-batch N]
"""

import argparse
import json
import os
import signal
import sys

import torch

torch.set_num_threads(1)


def setup(micro_batch: int = 2, **over):
    from compactor.data.windows import make_windows
    from compactor.distill.config import DistillConfig
    from compactor.distill.student import build_student
    from compactor.models.tiny import tiny_model

    g = torch.Generator().manual_seed(0)
    # Text with structure (a repeated random "vocabulary" of words) so the loss moves.
    words = [torch.randint(97, 123, (int(n),), generator=g) for n in torch.randint(2, 7, (40,), generator=g)]
    order = torch.randint(0, 40, (3000,), generator=g)
    stream = torch.cat([torch.cat([words[i], torch.tensor([32])]) for i in order.tolist()])
    ids = make_windows(stream, 32).input_ids
    teacher = tiny_model(num_hidden_layers=4)
    student = build_student(teacher, "layers:every-other", progress=False)
    kw = dict(tokens=32 * 8 * 10, window=32, batch=8, micro_batch=micro_batch, lr=3e-3,
              checkpoint_every=2, kl=0.5, ce=0.5, hidden_mse=0.1, eval_tokens=0, precision="fp32")
    kw.update(over)
    return teacher, student, DistillConfig(**kw), ids


def pretrain(model, ids: torch.Tensor, steps: int = 60, lr: float = 3e-3):
    """A few CE steps so the tiny teacher models the text (a random teacher teaches noise)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(steps):
        b = ids[torch.randint(0, len(ids), (16,), generator=g)]
        opt.zero_grad()
        model(input_ids=b, labels=b).loss.backward()
        opt.step()
    return model.eval()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("workdir")
    ap.add_argument("out")
    ap.add_argument("--kill-at", type=int, default=None)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--strategy", default="ddp")
    a = ap.parse_args()
    from compactor.distill.teacher import LiveTeacher
    from compactor.distill.trainer import Distiller

    teacher, student, cfg, ids = setup(a.micro_batch, strategy=a.strategy)
    tr = Distiller(student, LiveTeacher(teacher), cfg, ids, a.workdir, teacher_model=teacher, progress=False)
    losses = []

    def on_step(d, rec):
        losses.append(rec["loss"])
        if a.kill_at is not None and d.step == a.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    tr.train(resume=a.resume, on_step=on_step)
    if tr.rank == 0:
        from safetensors.torch import save_file

        save_file({k: v.detach().clone().contiguous() for k, v in tr.student.model.state_dict().items()}, a.out)
        with open(a.out + ".json", "w") as f:
            json.dump({"losses": losses, "resumed_from": tr.resumed_from}, f)
    from compactor.distributed import shutdown

    shutdown()  # as the CLI does: no gloo group left for interpreter finalization
    return 0


if __name__ == "__main__":
    sys.exit(main())
