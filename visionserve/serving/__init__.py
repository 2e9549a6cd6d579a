"""Serving many models in one process: the registry (`registry`), each model (`model`) with its
lifecycle, admission and inference pipeline, and the compute budget they share (`budget`)."""
