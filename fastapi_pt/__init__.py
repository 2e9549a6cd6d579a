"""Deployable: the HTTP inference service on PyTorch."""
