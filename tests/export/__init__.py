"""Tests of ``hadamard_sparse.export``."""
