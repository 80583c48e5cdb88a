"""Benchmarks: `python -m bench [suite ...]`. See bench/__main__.py."""
