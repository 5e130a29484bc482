"""compactor: distill, prune and quantize transformer LMs on a CPU; export artifacts real
runtimes load, with an honest measurement of what compression cost.

The public API only; implementations live in the subpackages.
"""

__version__ = "0.1.0"

from compactor.api import quantize_  # noqa: E402
from compactor.evaluate import evaluate  # noqa: E402
from compactor.models.load import load_model  # noqa: E402
from compactor.recipe import load_recipe, run_recipe  # noqa: E402

__all__ = ["__version__", "evaluate", "load_model", "load_recipe", "quantize_", "run_recipe"]
