"""Model loading and architecture knowledge."""
