"""Base class for every step configuration: a frozen dataclass validated on construction.

Configs round-trip through plain dicts (and so YAML): ``Cfg.from_dict(d)`` rejects unknown keys
naming the key and the allowed ones; fields annotated with ``Literal[...]`` only accept those
values; ``__post_init__`` hooks add range checks through :func:`check`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, ClassVar, Literal, get_args, get_origin, get_type_hints

from compactor.errors import ConfigError


def check(ok: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``ok``."""
    if not ok:
        raise ConfigError(message)


def _type_ok(value: Any, tp: Any) -> bool:
    origin = get_origin(tp)
    if tp is Any:
        return True
    if origin is Literal:
        return value in get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(args) == len(value) and all(_type_ok(v, a) for v, a in zip(value, args))
        inner = args[0] if args else Any
        return all(_type_ok(v, inner) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def _describe(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Base for step configs. Subclasses are frozen dataclasses with typed, defaulted fields.

    ``name`` (class variable) is the short name used in recipes and the registry.
    """

    name: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            tp = hints[f.name]
            if not _type_ok(value, tp):
                raise ConfigError(
                    f"{self.name or type(self).__name__}.{f.name}: got {value!r}, "
                    f"expected {_describe(tp)}"
                )
            # YAML gives lists; keep configs hashable and immutable.
            if isinstance(value, list):
                object.__setattr__(self, f.name, tuple(value))
        self.validate()

    def validate(self) -> None:
        """Range checks beyond types; override in subclasses (use :func:`check`)."""

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "StepConfig":
        """Build from a plain dict, rejecting unknown keys by name."""
        if data is not None and not isinstance(data, dict):
            raise ConfigError(f"{cls.name or cls.__name__}: settings must be a mapping of keys, got "
                              f"{type(data).__name__}")
        data = dict(data or {})
        allowed = cls.field_names()
        unknown = [k for k in data if k not in allowed]
        if unknown:
            raise ConfigError(
                f"{cls.name or cls.__name__}: unknown key {unknown[0]!r}; "
                f"allowed keys: {', '.join(allowed) or '(none)'}"
            )
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (tuples become lists) for YAML/JSON."""

        def plain(v: Any) -> Any:
            if isinstance(v, tuple):
                return [plain(x) for x in v]
            return v

        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}
