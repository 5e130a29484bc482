"""Quantization algorithms: one module per method (config + pure core + handler)."""
