"""Scenario presets, the simulation runner, benchmarks."""
