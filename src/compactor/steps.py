"""Imports every module that registers recipe steps (explicit, no package scanning)."""

from compactor.evaluate import step as _evaluate  # noqa: F401
