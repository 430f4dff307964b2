"""Gymnasium environments for operator-level and model-level autoscaling."""
