"""Simulated heads for tests, samples, benchmarks and network training (honest physics)."""
