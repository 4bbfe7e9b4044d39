"""Tests of ``hadamard_sparse.recover``."""
