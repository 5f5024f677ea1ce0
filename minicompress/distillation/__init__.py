"""Distillation: losses, the training loop, attention kernels, teacher caches, sampling."""
