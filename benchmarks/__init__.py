"""Benchmarks that anyone can rerun: speed, scale and quality figures behind the docs' tables.

The locations they share with the tests are the tests' (:mod:`tests.repository`)."""

from tests.repository import REPO, SHARED_DATA

__all__ = ["REPO", "SHARED_DATA"]
