"""Side-by-side benchmark runners (shipped as ``fastdense.benchmarks``, used by ``fastdense bench``)
and the pytest-benchmark suites (``pytest benchmarks/ --benchmark-only``)."""
