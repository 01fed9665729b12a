"""Fixtures the ckpt tests share with the pcache tests."""

from tests.pcache.conftest import make_cluster  # noqa: F401 - a pcache cluster per test
