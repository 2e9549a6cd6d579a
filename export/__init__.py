"""The export step: a PyTorch model -> a verified model repository entry (`python -m export`)."""
