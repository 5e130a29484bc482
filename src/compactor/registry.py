"""Maps step config classes to their handlers; lookup by class or by short name.

A new method is a :class:`~compactor.config.StepConfig` subclass plus one decorated handler::

    @register(GPTQConfig)
    def _apply_gptq(ctx, cfg): ...

No package scanning: modules that define steps are imported by :mod:`compactor.steps`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from compactor.config import StepConfig
from compactor.errors import ConfigError


@dataclass(frozen=True)
class Entry:
    config_cls: type[StepConfig]
    handler: Callable[..., Any]
    # "module": handler(module, cfg, name=, stats=) -> replacement module (walkers apply it);
    # "pair": handler(layer, cfg, name=, producer=, consumers=, stats=) folds scales (AWQ);
    # "plan": handler(modules, hessians, cfg, measure=, tensors=) -> (grid per name, report)
    #   (mixed precision; the recipe runner supplies Hessians and a KL probe);
    # "model": handler(ctx, cfg) changes the model as a whole (structured cuts);
    # "eval": handler(ctx, cfg), run by the recipe runner, leaves the model as it is.
    kind: str


_BY_NAME: dict[str, Entry] = {}


def register(config_cls: type[StepConfig], kind: str = "module") -> Callable:
    """Decorator: register a handler for ``config_cls`` under ``config_cls.name``.

    ``kind="module"``: ``handler(module, cfg, name=..., stats=...) -> replacement module``,
    applied by a walker; ``kind="eval"``: ``handler(ctx, cfg)`` run by the recipe runner."""
    if not config_cls.name:
        raise TypeError(f"{config_cls.__name__} needs a class-level `name`")

    def deco(fn: Callable) -> Callable:
        existing = _BY_NAME.get(config_cls.name)
        if existing is not None and existing.handler is not fn:
            raise TypeError(f"step {config_cls.name!r} registered twice")
        _BY_NAME[config_cls.name] = Entry(config_cls, fn, kind)
        return fn

    return deco


def lookup(name: str) -> Entry:
    """The registry entry for a short step name, or a ConfigError listing the known ones."""
    import compactor.steps  # noqa: F401  (registers the built-in steps)

    try:
        return _BY_NAME[name]
    except KeyError:
        raise ConfigError(
            f"unknown step {name!r}; known steps: {', '.join(sorted(_BY_NAME))}"
        ) from None


def lookup_config(cfg: StepConfig) -> Entry:
    """The registry entry for a config instance."""
    return lookup(type(cfg).name)


def known_steps() -> list[str]:
    import compactor.steps  # noqa: F401

    return sorted(_BY_NAME)
