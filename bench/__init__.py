"""Benchmarks of streamrl (not part of the test suite); see bench/RESULTS.md."""
