"""The test suite, laid out like the package: ``tests/export`` tests ``hadamard_sparse/export`` and so on.

``tests/project`` holds what tests the project as a whole (README, docs, notebooks, architecture).
Every folder is a package, so two test files in different folders may share a name; helpers are
imported by their full name (``from tests.conftest import mlp``, ``from tests.hf_models import bert_config``).
"""
