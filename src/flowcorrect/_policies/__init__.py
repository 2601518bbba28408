"""Concrete policies shipped with flowcorrect (reference models for tests and benchmarks)."""
