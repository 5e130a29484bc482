"""Imports every module that registers recipe steps (explicit, no package scanning)."""

from compactor.evaluate import step as _evaluate  # noqa: F401
from compactor.quant import awq as _awq  # noqa: F401
from compactor.quant import gptq as _gptq  # noqa: F401
from compactor.quant import rtn as _rtn  # noqa: F401
from compactor.quant import embedding as _embedding  # noqa: F401
from compactor.quant import activations as _activations  # noqa: F401
from compactor.quant import smoothquant as _smoothquant  # noqa: F401
from compactor.quant import mixed as _mixed  # noqa: F401
from compactor.quant import fakequant as _fakequant  # noqa: F401
from compactor.export import step as _export  # noqa: F401
from compactor.export import llamacpp as _llamacpp  # noqa: F401
from compactor.prune import magnitude as _magnitude  # noqa: F401
from compactor.prune import wanda as _wanda  # noqa: F401
from compactor.prune import sparsegpt as _sparsegpt  # noqa: F401
from compactor.prune import cuts as _cuts  # noqa: F401
from compactor.prune import lottery as _lottery  # noqa: F401
from compactor.distill import step as _distill  # noqa: F401
from compactor.distill import qat as _qat  # noqa: F401
from compactor.distill import lora as _lora  # noqa: F401
