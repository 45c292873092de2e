"""Hydra experiments for the adalora library: tasks, the training loop, run-folder writers."""
