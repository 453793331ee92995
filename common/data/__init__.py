"""Datasets and partitioning. Raw examples and any statistics of them stay on the client."""
