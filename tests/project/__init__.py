"""Tests of the project as a whole: README commands, docs snippets, notebooks, the import graph."""
