"""The package's top: ``import ckpt; ckpt.Writer`` (and ``import pcache; pcache.PcacheClient``)."""

from __future__ import annotations

import pytest

import ckpt
import pcache


def test_every_ckpt_export_resolves_to_its_module_object() -> None:
    from ckpt import api, storage

    assert ckpt.Writer is storage.Writer and ckpt.save is api.save
    for name in ckpt.__all__:
        assert getattr(ckpt, name) is not None
        assert name in dir(ckpt)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        ckpt.nope  # noqa: B018


def test_pcache_exports_the_client_its_config_and_error_types() -> None:
    from pcache.client import PcacheClient

    assert pcache.PcacheClient is PcacheClient
    assert issubclass(pcache.WorkerUnavailable, OSError)  # a domain type and a builtin
    assert set(pcache.__all__) <= set(dir(pcache))
