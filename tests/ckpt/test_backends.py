"""ckpt over its other backends (pcache workers, S3 token data), checkpoint ids, staging caps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from ckpt.api import AsyncSaver, is_complete, latest, load, save, step_url
from ckpt.storage import CheckpointError, Reader, Writer
from ckpt.trainer.data import TokenData, write_token_dataset
from objstore import Config, open_store
from tests.conftest import unique_bucket
from tests.servers.s3_process import write_config

pytestmark = pytest.mark.timeout(120)


def sample_state(scale: float) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(5)
    return {
        "model": {"w": torch.randn(512, 256, generator=gen) * scale, "b": torch.arange(7)},
        "meta": {"step": int(scale), "note": "x"},
    }


def test_save_and_load_through_pcache_workers(make_cluster, monkeypatch) -> None:
    cluster, store = make_cluster(1)
    for key, value in cluster.env(cluster.nodes[0]).items():
        if key.startswith("PCACHE_"):
            monkeypatch.setenv(key, value)
    root = "pcache://data/run1/"
    for step in (1, 2):
        save(sample_state(float(step)), step_url(root, step))
    # remote-durable by default: the files are in the backing store, .metadata included
    keys = {o.key for o in store.iter_list("run1/")}
    assert "run1/step-00000002/.metadata" in keys and "run1/step-00000002/__0_0.distcp" in keys
    assert latest(root) == (2, step_url(root, 2))
    target = sample_state(0.0)
    target["model"]["w"].zero_()
    result = load(target, step_url(root, 2), verify=True)
    assert torch.equal(target["model"]["w"], sample_state(2.0)["model"]["w"])
    assert target["meta"]["step"] == 2 and result.bytes_read > 512 * 256 * 4
    assert not is_complete("pcache://data/run1/step-00000003/")


def test_token_data_from_an_s3_url(rclone_s3, tmp_path: Path, monkeypatch) -> None:
    bucket = unique_bucket("tok")
    rclone_s3.create_bucket(bucket)
    config = write_config(tmp_path / "objstore.toml", s3=rclone_s3.profile())
    monkeypatch.setenv("OBJSTORE_CONFIG", str(config))
    store = open_store(f"s3://s3@{bucket}/tokens/", Config.load(config))
    write_token_dataset(store, shards=2, tokens=5000, seed=1)
    data = TokenData(f"s3://s3@{bucket}/tokens/")
    assert data.tokens.numel() == 10_000 and int(data.tokens.max()) < 32_768
    one = data.batch(seed=1, step=3, rank=0, batch=2, length=9)
    assert one.shape == (2, 9) and torch.equal(one, data.batch(1, 3, 0, 2, 9))
    assert not torch.equal(one, data.batch(1, 4, 0, 2, 9))
    with pytest.raises(FileNotFoundError, match="no token shards"):
        TokenData(f"s3://s3@{bucket}/nothing/")


def test_async_save_refuses_a_share_over_the_staging_cap(tmp_path: Path) -> None:
    saver = AsyncSaver(staging_cap=1024)
    try:
        with pytest.raises(CheckpointError, match="over the staging cap"):
            saver.save(sample_state(1.0), str(tmp_path / "ck"))
    finally:
        saver.close()
    assert not (tmp_path / "ck").exists()


def test_checkpoint_ids_the_plugin_serves() -> None:
    for ok in (
        "s3://bucket/run/step-1/",
        "oss://b/x/",
        "pcache://ns/ckpt/",
        "/tmp/ck",
        "file:///tmp/x",
    ):
        assert Writer.validate_checkpoint_id(ok) and Reader.validate_checkpoint_id(ok), ok
    for bad in ("s3:/broken", "pcache://", "nosuchscheme://b/x", ""):
        assert not Writer.validate_checkpoint_id(bad), bad
