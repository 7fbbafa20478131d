"""Benchmarks behind ``neuralsync bench``: each prints its figures measured side by side."""
