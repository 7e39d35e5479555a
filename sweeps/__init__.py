"""Hyperparameter sweeps from W&B sweep files, run offline: the points, the best one, its evaluation."""
