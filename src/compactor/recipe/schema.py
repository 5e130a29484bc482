"""The recipe schema: a model, evaluation and calibration settings, and ordered stages of
steps. Every key is validated; unknown keys and bad values are rejected by name.

Example::

    model: smollm2-135m
    eval: {data: "austen:eval", tokens: 16384}
    stages:
      - name: baseline
        steps:
          - evaluate: {source: input.gguf}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from compactor.config import StepConfig, check
from compactor.errors import ConfigError


@dataclass(frozen=True)
class EvalSettings(StepConfig):
    """How the runner evaluates after each stage (and the default for ``evaluate`` steps).

    ``data``: one spec, a list, or a comma-separated string; ``domains`` stands for every
    evaluation domain (Austen prose, Python code, technical prose, C headers; see
    :mod:`compactor.data.domains`). With several, each is scored and the headline is their
    mean. ``tokens``: per domain."""

    name = "eval"
    data: str | tuple[str, ...] = "domains"
    tokens: int = 8192
    window: int = 512
    stride: int | None = None
    bos: Literal["auto", "none", "prepend"] = "auto"  # auto: what the model's tokenizer does
    speed: bool = True
    after_each_stage: bool = True

    def validate(self) -> None:
        from compactor.data.windows import split_specs
        from compactor.errors import CompactorError

        try:
            split_specs(self.data)
        except CompactorError as exc:
            check(False, f"eval.data: {exc}")
        check(self.tokens >= self.window, f"eval.tokens ({self.tokens}) must be >= eval.window ({self.window})")
        check(self.window >= 2, f"eval.window must be >= 2, got {self.window}")


@dataclass(frozen=True)
class CalibrationSettings(StepConfig):
    """Calibration data for calibrated steps: ``samples`` windows of ``window`` tokens.

    The default ``calib:mix`` balances prose, chat, code and technical text by tokens."""

    name = "calibration"
    data: str = "calib:mix"
    samples: int = 128
    window: int = 512

    def validate(self) -> None:
        check(self.samples >= 1, f"calibration.samples must be >= 1, got {self.samples}")
        check(self.window >= 2, f"calibration.window must be >= 2, got {self.window}")


@dataclass
class Step:
    config: StepConfig

    @property
    def name(self) -> str:
        return type(self.config).name


@dataclass
class Stage:
    name: str
    steps: list[Step]
    gate: Any = None  # a recipe.gates.Gate, or None


@dataclass
class Recipe:
    """A parsed, validated recipe."""

    model: str
    stages: list[Stage]
    reference: str | None = "original"
    eval: EvalSettings = field(default_factory=EvalSettings)
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)
    #: stream the weights layer by layer from disk instead of loading the model whole
    stream: bool = False
    #: memory cap of the run's plan ("8GB", "512MB"; None: the memory available)
    max_memory: str | None = None
    #: keep calibration activations on disk between layers (one batch in memory)
    spill_activations: bool = False

    _TOP_KEYS = ("model", "reference", "eval", "calibration", "stream", "max_memory",
                 "spill_activations", "stages")

    @classmethod
    def from_dict(cls, data: Any, where: str = "recipe") -> "Recipe":
        from compactor.registry import lookup

        if not isinstance(data, dict):
            raise ConfigError(f"{where}: a recipe must be a mapping with keys {', '.join(cls._TOP_KEYS)}")
        unknown = [k for k in data if k not in cls._TOP_KEYS]
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r}; allowed keys: {', '.join(cls._TOP_KEYS)}")
        if not isinstance(data.get("model"), str) or not data["model"].strip():
            raise ConfigError(f"{where}: 'model' is required (an alias, directory or .gguf path)")
        ref = data.get("reference", "original")
        if ref is not None and not isinstance(ref, str):
            raise ConfigError(f"{where}: 'reference' must be 'original', a model source or null")
        stages_raw = data.get("stages")
        if not isinstance(stages_raw, list) or not stages_raw:
            raise ConfigError(f"{where}: 'stages' must be a non-empty list")
        stages = []
        for i, st in enumerate(stages_raw):
            here = f"{where}: stages[{i}]"
            if not isinstance(st, dict):
                raise ConfigError(f"{here}: a stage is a mapping with keys name, steps")
            bad = [k for k in st if k not in ("name", "steps", "gate")]
            if bad:
                raise ConfigError(f"{here}: unknown key {bad[0]!r}; allowed keys: name, steps, gate")
            steps_raw = st.get("steps")
            if not isinstance(steps_raw, list) or not steps_raw:
                raise ConfigError(f"{here}: 'steps' must be a non-empty list")
            steps = []
            for j, s in enumerate(steps_raw):
                if not (isinstance(s, dict) and len(s) == 1):
                    raise ConfigError(f"{here}.steps[{j}]: a step is a one-key mapping, e.g. `- evaluate: {{}}`")
                (sname, body), = s.items()
                if body is not None and not isinstance(body, dict):
                    raise ConfigError(f"{here}.steps[{j}] ({sname}): settings must be a mapping")
                entry = lookup(sname)
                try:
                    steps.append(Step(entry.config_cls.from_dict(body)))
                except ConfigError as exc:
                    raise ConfigError(f"{here}.steps[{j}]: {exc}") from None
            gate = None
            if st.get("gate") is not None:
                from compactor.recipe.gates import Gate

                try:
                    gate = Gate.from_dict(st["gate"])
                except ConfigError as exc:
                    raise ConfigError(f"{here}: {exc}") from None
            stages.append(Stage(str(st.get("name", f"stage{i}")), steps, gate))
        stream, spill = data.get("stream", False), data.get("spill_activations", False)
        for key, val in (("stream", stream), ("spill_activations", spill)):
            if not isinstance(val, bool):
                raise ConfigError(f"{where}: '{key}' must be true or false, got {val!r}")
        max_memory = data.get("max_memory")
        if max_memory is not None:
            from compactor.memory import parse_bytes

            try:
                parse_bytes(max_memory)
            except ValueError as exc:
                raise ConfigError(f"{where}: max_memory: {exc}") from None
        try:
            ev = EvalSettings.from_dict(data.get("eval"))
            cal = CalibrationSettings.from_dict(data.get("calibration"))
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        return cls(model=data["model"], stages=stages, reference=ref, eval=ev, calibration=cal,
                   stream=stream, max_memory=None if max_memory is None else str(max_memory),
                   spill_activations=spill)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "reference": self.reference,
            "eval": self.eval.to_dict(),
            "calibration": self.calibration.to_dict(),
            "stream": self.stream,
            "max_memory": self.max_memory,
            "spill_activations": self.spill_activations,
            "stages": [
                {"name": st.name, "steps": [{s.name: s.config.to_dict()} for s in st.steps],
                 **({"gate": {k: v for k, v in st.gate.to_dict().items() if v is not None}} if st.gate else {})}
                for st in self.stages
            ],
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def load_recipe(path: str | Path):
    """Parse and validate a recipe file: a :class:`Recipe`, or a task recipe
    (:class:`compactor.recipe.task.TaskRecipe`) when it has a ``task`` key."""
    from compactor.errors import CompactorError

    path = Path(path)
    if not path.is_file():
        raise CompactorError(f"recipe not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        what = getattr(exc, "problem", None) or " ".join(str(exc).split())
        raise ConfigError(f"{where}: not valid YAML ({what})") from None
    from compactor.recipe.task import TaskRecipe, is_task_recipe

    if is_task_recipe(data):  # an encoder's fine-tune / distill / export pipeline
        return TaskRecipe.from_dict(data, where=str(path))
    return Recipe.from_dict(data, where=str(path))
