"""socknet benchmarks: `make bench` (`python -m bench.run`).

One module per benchmark; each registers ``fn(ctx) -> list[Row]`` with
``@bench.core.benchmark(name, title=..., order=...)`` and is found by
`bench.run` automatically (every module of this package not starting with "_").
See `bench.core` for the API and docs/benchmarks.md for the results.
"""
