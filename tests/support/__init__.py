"""Test support importable without pytest: the local stack (what ``make run`` starts, and what
the end-to-end, deploy and load tests and the benchmarks run) and its helpers."""
