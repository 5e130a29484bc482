"""Fixtures of the task path's tests: a tiny random BERT, a synthetic task, a trained teacher."""

import pytest
import torch

from tests.task.tiny import examples, make_encoder, write_jsonl

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("task")
    return {"dir": d, "encoder": make_encoder(d / "enc", layers=2),
            "train": write_jsonl(d / "train.jsonl", examples(1200, 1)),
            "dev": write_jsonl(d / "dev.jsonl", examples(200, 3)),
            "test": write_jsonl(d / "test.jsonl", examples(600, 2))}


@pytest.fixture(scope="module")
def teacher_dir(task_files):
    from compactor.task.api import finetune
    from compactor.task.train import TaskTrainConfig

    out = task_files["dir"] / "teacher"
    finetune(str(task_files["encoder"]), task_files["train"], None, out,
             TaskTrainConfig(epochs=4, batch=32, lr=3e-3, head_lr=3e-3, max_length=16, checkpoint_every=0),
             progress=False)
    return out
