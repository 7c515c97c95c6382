"""Clustering: the pseudo-label head (Algorithm 2), its baselines and the metrics."""
