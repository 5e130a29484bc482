"""Pure tensor functions: no nn.Module walking, no transformers imports."""
