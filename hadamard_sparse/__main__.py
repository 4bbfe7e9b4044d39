"""``python -m hadamard_sparse``: runs the command line of :mod:`hadamard_sparse.cli`."""

from __future__ import annotations

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
