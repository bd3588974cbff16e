"""Hybrid backend: the PyTorch backbone of ``medusa`` with Medusa heads computed in Jittor."""
