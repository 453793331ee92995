"""Benchmarks: scripts that measure Ferry's tools on realistic inputs (``python -m ...``)."""
