"""Tests of ``hadamard_sparse.compress``."""
