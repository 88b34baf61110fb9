"""Benchmarks for idlab (run as ``python -m bench.<name>``); results land in bench/results/."""
