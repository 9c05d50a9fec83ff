"""Benchmarks of tf_overparam: `python -m benchmarks.run [--quick]` (see `benchmarks.run`)."""
