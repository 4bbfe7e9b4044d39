"""Tests of ``hadamard_sparse.schedules``."""
