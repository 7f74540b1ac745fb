"""Benchmarks behind `vla bench NAME`: each prints one JSON object on stdout."""
