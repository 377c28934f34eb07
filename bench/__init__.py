"""Benchmarks: `python -m bench.NAME --json` prints one JSON object of figures against a same-run baseline."""
