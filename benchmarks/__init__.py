"""Benchmark entry points of a checkout: ``python -m benchmarks.train_step`` (the same as ``fbp bench``,
whose harness is ``fbp.bench``) and ``python -m benchmarks.scaling``; results in RESULTS.md."""
