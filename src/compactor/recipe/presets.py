"""Method presets: the recipe steps a method name stands for (``compactor quantize
--method``, the search's candidates), so the command line and the search build the same
recipes."""

from __future__ import annotations

from compactor.errors import CompactorError

#: weight-only methods on one grid, cheapest first
WEIGHT_METHODS = ("rtn", "gptq", "awq", "awq+gptq")


def weight_steps(method: str, grid: dict, gptq: dict | None = None, clip: bool = False) -> list[dict]:
    """The steps of a weight-only ``method`` on ``grid`` (a grid's settings: ``{"grid":
    "q4_0"}`` or int/nf4 keys). ``gptq``: extra GPTQ settings; ``clip``: AWQ's clipping search.
    AWQ+GPTQ: AWQ's scales folded into the model (no rounding), then GPTQ on them."""
    g = {**grid, **(gptq or {})}
    steps = {"rtn": [{"rtn": dict(grid)}],
             "gptq": [{"gptq": g}],
             "awq": [{"awq": {**grid, "clip": clip}}],
             "awq+gptq": [{"awq": {**grid, "then": "none"}}, {"gptq": g}]}
    if method not in steps:
        raise CompactorError(f"method {method!r}: expected one of {', '.join(WEIGHT_METHODS)}")
    return steps[method]
