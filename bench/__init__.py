"""Benchmarks: the training core against the plain PyTorch loop, and orchestration figures."""
