"""Benchmarks, each run from the repository root as ``python -m bench.NAME`` (``make bench`` runs the quick
ones, ``make bench LONG=1`` all of them; the README's "Benchmarks" table has the figures)."""
