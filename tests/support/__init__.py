"""Helpers the tests share: modules, not fixtures (those live in conftest.py)."""
