"""Benchmarks (`make bench`): the agent's overhead, start-up, target slowdown, ingest capacity, accuracy
and scaling, measured in one run beside BCC's own tools, written to docs/benchmarks.md and .json.

Not part of the agent: nothing under agent/ imports this package. `python -m bench --help` lists the
options; `bench.__main__` runs the scenarios in order and `bench.report` writes the documents.
"""
