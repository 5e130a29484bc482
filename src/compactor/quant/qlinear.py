"""``QuantizedLinear``: a linear layer stored as integer codes + quantization parameters.

The codes are what exporters pack (no re-rounding); the forward pass uses the dequantized
weight (cached), so evaluation measures exactly the quantized model.
"""

from __future__ import annotations

import torch
from torch import nn

from compactor.primitives.qparams import QParams


def code_dtype(qp: QParams) -> torch.dtype:
    """The smallest integer dtype holding the grid's codes (int8; int16 for the 0..255 codes of
    8-bit asymmetric grids, which int8 would wrap)."""
    return torch.int8 if -128 <= qp.qmin and qp.qmax <= 127 else torch.int16


class QuantizedLinear(nn.Module):
    """Codes ``[out, in]`` (int8, or int16 when the range needs it) on grid ``label`` with their :class:`QParams`."""

    def __init__(self, codes: torch.Tensor, qp: QParams, label: str, bits_per_weight: float,
                 bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.label = label
        self.bits_per_weight = float(bits_per_weight)
        self.qparams = qp
        self.register_buffer("codes", codes.to(code_dtype(qp)), persistent=False)
        self.register_buffer("weight", qp.dequantize(codes).to(dtype), persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight.to(x.dtype), self.bias)

    def storage_nbytes(self) -> int:
        """Bytes the weight takes in its deployment format (+ bias in fp32)."""
        n = int(round(self.out_features * self.in_features * self.bits_per_weight / 8))
        return n + (0 if self.bias is None else self.bias.numel() * 4)

    def logical_numel(self) -> int:
        return self.out_features * self.in_features + (0 if self.bias is None else self.bias.numel())

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, grid={self.label}, bias={self.bias is not None}"

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding the dequantized weight."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        lin.weight.data.copy_(self.weight)
        if self.bias is not None:
            lin.bias.data.copy_(self.bias)
        return lin


class QuantizedEmbedding(QuantizedLinear):
    """A token embedding ``[vocab, hidden]`` stored as codes on a grid (rows are tokens, the
    grid's blocks run along the hidden dimension, as in GGUF's ``token_embd``).

    The dequantized table is a (frozen) parameter so that a tied output head can share it:
    :func:`tie_head` points the head at it, and both then compute with the quantized values.
    """

    def __init__(self, codes: torch.Tensor, qp: QParams, label: str, bits_per_weight: float,
                 dtype: torch.dtype = torch.float32):
        super().__init__(codes, qp, label, bits_per_weight, None, dtype)
        table = self.weight
        del self.weight  # the buffer becomes a parameter (shareable with a tied head)
        self.weight = nn.Parameter(table, requires_grad=False)

    @property
    def num_embeddings(self) -> int:
        return self.out_features

    @property
    def embedding_dim(self) -> int:
        return self.in_features

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(ids, self.weight)

    def extra_repr(self) -> str:
        return f"{self.out_features}, {self.in_features}, grid={self.label}"

    def to_linear(self) -> nn.Embedding:
        """A plain ``nn.Embedding`` sharing the dequantized table (keeps a tied head tied)."""
        emb = nn.Embedding(self.out_features, self.in_features)
        emb.weight = self.weight
        return emb


def tie_head(model, embed: str, lm_head: str) -> bool:
    """If ``model`` ties its output head to the embedding, point the head's weight at the
    embedding's current table. Returns whether the model is tied."""
    tied = bool(getattr(model.config, "tie_word_embeddings", False)) and lm_head
    if not tied:
        return False
    head = model.get_submodule(lm_head)
    if isinstance(head, QuantizedLinear):
        return True
    head.weight = model.get_submodule(embed).weight
    return True
