"""Task recipes (compactor.recipe.task): fine-tune -> distill -> export as data, gates, resume."""

import json

import pytest
import torch
import yaml

from compactor.cli import main
from compactor.errors import ConfigError
from compactor.recipe.task import TaskRecipe
from tests.task.tiny import examples, make_encoder, write_jsonl

torch.set_num_threads(1)
TRAIN = {"epochs": 3, "lr": 3.0e-3, "head_lr": 3.0e-3, "max_length": 16, "checkpoint_every": 0}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("taskrecipe")
    return {"dir": d, "encoder": str(make_encoder(d / "enc", layers=2)),
            "train": write_jsonl(d / "train.jsonl", examples(600, 1)),
            "dev": write_jsonl(d / "dev.jsonl", examples(100, 3)),
            "test": write_jsonl(d / "test.jsonl", examples(200, 2))}


def _recipe(files, retention=0.3, export_gate=None):
    return {"task": "classify", "model": files["encoder"],
            "data": {"train": files["train"], "dev": files["dev"], "test": files["test"]},
            "stages": [{"name": "teacher", "steps": [{"finetune": TRAIN}]},
                       {"name": "student", "steps": [{"distill": {**TRAIN, "student": "layers:1", "alpha": 0.7}}],
                        "gate": {"min_accuracy_retention": retention}},
                       {"name": "onnx", "steps": [{"export": {"int8": "dynamic"}}],
                        "gate": export_gate or {"max_size_mb": 100}}]}


def test_pipeline_runs_gates_and_writes_every_step(files, tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_recipe(files)))
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "student: 02-distill" in printed and "onnx: 03-export/model.int8.onnx" in printed
    assert {p.name for p in out.iterdir()} >= {"01-finetune", "02-distill", "03-export", "metrics.json", "recipe.yaml"}
    rec = json.loads((out / "metrics.json").read_text())
    rows = {r["stage"]: r for r in rec["stages"]}
    assert rows["teacher"]["retention"] == 1.0
    assert rows["student"]["gate"][0]["gate"] == "min_accuracy_retention" and rows["student"]["gate"][0]["passed"]
    teacher_acc = rec["teacher_eval"]["accuracy"]
    assert rows["onnx"]["retention"] == pytest.approx(rows["onnx"]["accuracy"] / teacher_acc)
    assert rows["onnx"]["size_bytes"] < rows["student"]["size_bytes"]  # int8
    # The saved recipe is the one that ran, and parses back to it.
    saved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert TaskRecipe.from_dict(saved) == TaskRecipe.from_dict(_recipe(files))
    assert not (tmp_path / "out.work").exists()


def test_failed_gate_exits_3_and_keeps_what_passed(files, tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_recipe(files, retention=2.0)))  # a student cannot double its teacher
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out), "--json"]) == 3
    captured = capsys.readouterr()
    assert "min_accuracy_retention: measured" in captured.err and "up to stage 'teacher'" in captured.err
    doc = json.loads(captured.out)
    assert doc["exit_code"] == 3 and [r["stage"] for r in doc["stages"]] == ["teacher", "student"]
    assert (out / "01-finetune").is_dir() and not (out / "02-distill").exists() and not (out / "03-export").exists()


def test_resume_skips_finished_steps(files, tmp_path, monkeypatch):
    import compactor.task.api as api
    from compactor.recipe.task import run_task_recipe

    calls = {"finetune": 0}
    real_finetune, real_distill = api.finetune, api.distill_task

    def finetune(*a, **k):
        calls["finetune"] += 1
        return real_finetune(*a, **k)

    def crash(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "finetune", finetune)
    monkeypatch.setattr(api, "distill_task", crash)
    out = tmp_path / "out"
    recipe = TaskRecipe.from_dict(_recipe(files))
    with pytest.raises(KeyboardInterrupt):
        run_task_recipe(recipe, out, progress=False)
    assert not out.exists() and (tmp_path / "out.work" / "01-finetune").is_dir()
    monkeypatch.setattr(api, "distill_task", real_distill)
    rec = run_task_recipe(recipe, out, progress=False, resume=True)
    assert calls["finetune"] == 1 and [r["stage"] for r in rec["stages"]] == ["teacher", "student", "onnx"]


@pytest.mark.parametrize("change,match", [
    ({"shape": 1}, "unknown key"),
    ({"task": "regress"}, "task must be one of classify"),
    ({"stages": [{"name": "x", "steps": [{"gptq": {}}]}]}, "a step is one of finetune, distill, export"),
    ({"stages": [{"name": "x", "steps": [{"finetune": {"alpha": 0.5}}]}]}, "labels only"),
    ({"stages": [{"name": "x", "steps": [{"finetune": {"epoch": 2}}]}]}, "epoch"),
    ({"stages": [{"name": "s", "steps": [{"distill": {}}], "gate": {"max_kld": 0.1}}]}, "language-model limits"),
    ({"stages": [{"name": "s", "steps": [{"distill": {}}]}]}, "needs 'teacher'"),
    ({"model": None}, "starts from 'model'"),
    ({"data": {"validation": "x"}}, "data takes the keys"),
])
def test_bad_recipes_are_refused_by_name(files, change, match):
    with pytest.raises(ConfigError, match=match):
        TaskRecipe.from_dict({**_recipe(files), **change})
