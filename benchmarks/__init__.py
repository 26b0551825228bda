"""The comparisons that bench.py runs, one module per comparison, over common.py (see bench.py's
docstring)."""
