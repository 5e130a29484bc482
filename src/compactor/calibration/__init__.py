"""Layer-by-layer calibration: capture inputs, observe with hooks, apply, propagate."""
