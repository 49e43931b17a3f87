"""Benchmarks for fbp: ``python -m benchmarks.train_step`` (also ``fbp bench``); results in RESULTS.md."""
