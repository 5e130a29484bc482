"""Task recipes: an encoder's fine-tune → distill → export pipeline as validated data, with
quality gates, run by ``compactor run`` like the language-model recipes.

.. code-block:: yaml

    task: classify
    model: minilm-l6                 # the encoder a finetune step starts from
    # teacher: runs/teacher          # or a task model already trained (then no finetune)
    data: {train: "tweets:train", dev: "tweets:dev", test: "tweets:test"}
    stages:
      - name: teacher
        steps: [{finetune: {epochs: 2}}]
      - name: student
        steps: [{distill: {student: "layers:3:lower", alpha: 0.5, epochs: 3}}]
        gate: {min_accuracy_retention: 0.97}
      - name: onnx int8
        steps: [{export: {int8: dynamic}}]
        gate: {min_accuracy_retention: 0.97, max_size_mb: 25}

Each step takes the current model and makes the next: ``finetune`` (the task teacher:
labels only), ``distill`` (a student of the teacher, by task KD; see
:func:`compactor.task.api.distill_task`), ``export`` (ONNX, + int8, verified in
onnxruntime). After every stage its model is scored on the test split, and a gate compares
that with the teacher's score (``min_accuracy_retention``) and the file (``max_size_mb``).

The output directory holds one directory per step (``01-finetune/`` ...), ``recipe.yaml``,
``metrics.json``; it is built in ``<out>.work/`` and renamed at the end, so an interrupted
run leaves no half-written output and ``--resume`` continues from the finished steps and the
checkpoints of the one that was running. A failed gate (exit 3) leaves the output with the
steps of the stages that passed and says so.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import ClassVar, Literal

import yaml

from compactor.config import StepConfig, check
from compactor.errors import ConfigError, GateFailed
from compactor.recipe.gates import Gate
from compactor.task.train import TaskTrainConfig

TASKS = ("classify",)


@dataclass(frozen=True)
class FinetuneStep(TaskTrainConfig):
    """``finetune``: the task teacher, trained on labels (every :class:`TaskTrainConfig` key)."""

    name: ClassVar[str] = "finetune"

    def validate(self) -> None:
        super().validate()
        check(self.alpha == 0 and self.cosine == 0 and self.attention == 0,
              "finetune trains on labels only: alpha, cosine and attention are distill keys")


@dataclass(frozen=True)
class DistillStep(TaskTrainConfig):
    """``distill``: a student of the teacher (``layers:...[+heads:F]``), optionally with the
    vocabulary trimmed to the training texts; the rest are :class:`TaskTrainConfig` keys."""

    name: ClassVar[str] = "distill"
    student: str = "layers:0.5"
    trim_vocab: bool = False
    alpha: float = 0.5
    epochs: float = 3.0


@dataclass(frozen=True)
class ExportStep(StepConfig):
    """``export``: ONNX of the current model, int8 ``dynamic`` / ``static`` or none."""

    name: ClassVar[str] = "export"
    int8: Literal["none", "dynamic", "static"] = "none"


STEPS = {c.name: c for c in (FinetuneStep, DistillStep, ExportStep)}
_TOP = ("task", "model", "teacher", "data", "stages")
_DATA = {"train": "tweets:train", "dev": "tweets:dev", "test": "tweets:test"}


@dataclass(frozen=True)
class TaskStage:
    name: str
    steps: tuple[StepConfig, ...]
    gate: Gate | None = None


@dataclass(frozen=True)
class TaskRecipe:
    task: str
    model: str | None
    teacher: str | None
    data: dict
    stages: tuple[TaskStage, ...]

    @classmethod
    def from_dict(cls, d: dict, where: str = "recipe") -> "TaskRecipe":
        unknown = [k for k in d if k not in _TOP]
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))} of a task recipe; "
                              f"allowed: {', '.join(_TOP)}")
        if d.get("task") not in TASKS:
            raise ConfigError(f"{where}: task must be one of {', '.join(TASKS)}, got {d.get('task')!r}")
        data = d.get("data") or {}
        if not isinstance(data, dict) or any(k not in _DATA for k in data):
            raise ConfigError(f"{where}: data takes the keys {', '.join(_DATA)} (labeled data specs)")
        stages = []
        for i, st in enumerate(d.get("stages") or []):
            if not isinstance(st, dict) or set(st) - {"name", "steps", "gate"} or not st.get("steps"):
                raise ConfigError(f"{where}: stage {i + 1} needs 'name' and 'steps' (and optionally 'gate')")
            steps = []
            for s in st["steps"]:
                if not isinstance(s, dict) or len(s) != 1 or next(iter(s)) not in STEPS:
                    raise ConfigError(f"{where}: stage {st.get('name', i + 1)!r}: a step is one of "
                                      f"{', '.join(STEPS)} with its settings, got {s!r}")
                (name, kw), = s.items()
                steps.append(STEPS[name].from_dict(kw))
            gate = Gate.from_dict(st["gate"]) if st.get("gate") else None
            if gate is not None and any(getattr(gate, k) is not None for k in
                                        ("max_kld", "max_ppl_ratio", "min_top1", "max_bpw", "min_decode_speedup")):
                raise ConfigError(f"{where}: stage {st['name']!r}: a task gate takes min_accuracy_retention "
                                  "and max_size_mb (the others are language-model limits)")
            stages.append(TaskStage(str(st.get("name", f"stage {i + 1}")), tuple(steps), gate))
        if not stages:
            raise ConfigError(f"{where}: a task recipe needs at least one stage")
        kinds = [type(s) for st in stages for s in st.steps]
        if d.get("teacher") is None and FinetuneStep not in kinds:
            raise ConfigError(f"{where}: without a finetune step the recipe needs 'teacher' (a task model)")
        if FinetuneStep in kinds and d.get("model") is None:
            raise ConfigError(f"{where}: a finetune step starts from 'model' (an encoder)")
        return cls(d["task"], d.get("model"), d.get("teacher"), {**_DATA, **data}, tuple(stages))

    def to_dict(self) -> dict:
        def step(s):
            default = type(s)()
            return {s.name: {f.name: getattr(s, f.name) for f in fields(s)
                             if getattr(s, f.name) != getattr(default, f.name)}}

        return {"task": self.task, "model": self.model, "teacher": self.teacher, "data": dict(self.data),
                "stages": [{"name": st.name, "steps": [step(s) for s in st.steps],
                            **({"gate": {k: v for k, v in st.gate.to_dict().items() if v is not None}}
                               if st.gate else {})} for st in self.stages]}


def is_task_recipe(data) -> bool:
    return isinstance(data, dict) and "task" in data


def _train_cfg(step) -> TaskTrainConfig:
    return TaskTrainConfig(**{f.name: getattr(step, f.name) for f in fields(TaskTrainConfig)})


def run_task_recipe(recipe: TaskRecipe, out: str | Path, overwrite: bool = False, resume: bool = False,
                    progress: bool = True) -> dict:
    """Run ``recipe`` into ``out`` (see the module docstring); returns the metrics record."""
    from compactor.recipe.gates import check_task_gate, describe_failure
    from compactor.task.api import distill_task, eval_task, export_task, finetune

    out = Path(out)
    if out.exists() and not overwrite:
        raise ConfigError(f"output {out} already exists (pass --force to replace it)")
    work = out.with_name(out.name + ".work")
    if work.exists() and not resume:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    d = recipe.data
    current, teacher = recipe.model, recipe.teacher
    record = {"recipe": recipe.to_dict(), "stages": [], "teacher_eval": None}
    cache = work / "evals.json"  # evaluations of finished steps, kept for --resume
    evals = json.loads(cache.read_text()) if cache.exists() else {}

    def evaluate(model: str) -> dict:
        if model not in evals:
            evals[model] = eval_task(model, d["test"], speed=False)
            cache.write_text(json.dumps(evals, default=str))
        return evals[model]

    n, failed = 0, None
    for stage in recipe.stages:
        t0 = time.perf_counter()
        for step in stage.steps:
            n += 1
            dest = work / f"{n:02d}-{step.name}"
            done = dest.exists()  # outputs are atomic: a step directory that exists is complete
            if isinstance(step, FinetuneStep):
                if not done:
                    finetune(current, d["train"], d["dev"], dest, _train_cfg(step), progress, resume, True)
                current = teacher = str(dest)
            elif isinstance(step, DistillStep):
                if not done:
                    distill_task(teacher, step.student, d["train"], d["dev"], dest, _train_cfg(step),
                                 step.trim_vocab, progress, resume, True)
                current = str(dest)
            else:
                if current.endswith(".onnx"):
                    raise ConfigError(f"stage {stage.name!r}: export needs a task model directory, "
                                      "the current model is already an ONNX graph")
                if not done:
                    export_task(current, dest, None if step.int8 == "none" else step.int8, d["train"], d["test"],
                                overwrite=True)
                onnx = sorted(dest.glob("*.onnx"), key=lambda p: ("int8" not in p.name, p.name))
                current = str(onnx[0] if step.int8 != "none" else next(p for p in onnx if "int8" not in p.name))
        res = evaluate(current)
        ref = evaluate(teacher) if teacher is not None else None
        record["teacher_eval"] = ref
        row = {"stage": stage.name, "model": Path(current).relative_to(work).as_posix(),
               "accuracy": res["accuracy"], "macro_f1": res["macro_f1"], "size_bytes": res["size_bytes"],
               "retention": res["accuracy"] / ref["accuracy"] if ref else None,
               "seconds": round(time.perf_counter() - t0, 1)}
        if stage.gate is not None and not stage.gate.empty:
            checks = check_task_gate(stage.gate, res, ref)
            row["gate"] = checks
            if not all(c["passed"] for c in checks):
                record["stages"].append(row)
                passed = record["stages"][-2]["stage"] if len(record["stages"]) > 1 else None
                kept = (f"the output holds the steps up to stage {passed!r}, the last that passed" if passed
                        else "the output holds no model (no stage before it)")
                failed = describe_failure(stage.name, checks, kept)
                _drop_steps_of(work, stage, n)
                break
        record["stages"].append(row)
    (work / "metrics.json").write_text(json.dumps(record, indent=1, default=str))
    (work / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    cache.unlink(missing_ok=True)
    if out.exists():
        shutil.rmtree(out)
    work.rename(out)
    if failed:
        raise GateFailed(failed)
    return record


def _drop_steps_of(work: Path, stage: TaskStage, last: int) -> None:
    """Remove the outputs of a failed stage's steps (numbered up to ``last``)."""
    for i in range(last - len(stage.steps) + 1, last + 1):
        for p in work.glob(f"{i:02d}-*"):
            shutil.rmtree(p, ignore_errors=True)
