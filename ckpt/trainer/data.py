"""Token shards: the dataset format the demo syncs and the trainer reads.

A dataset is a directory (local path, objstore URL, or a path inside a pcache mount) of
``shard-NNNNN.bin`` files of little-endian uint16 token ids, plus ``index.json`` naming them
(``{"vocab", "dtype": "uint16", "shards": [{"key", "tokens"}]}``). :func:`token_shard` makes one;
:class:`TokenData` reads all shards once and serves deterministic batches: the batch of
(seed, step, rank) never depends on anything else, so a resumed run sees the same data.
"""

from __future__ import annotations

import json
import random
from typing import Any

import torch

from objstore import open_store

VOCAB = 32_768
_HIGH_BYTE_MASK = bytes(b & 0x7F for b in range(256))


def token_shard(rng: random.Random, tokens: int) -> bytes:
    """A shard of little-endian uint16 token ids below VOCAB (2**15): random bytes with the high
    bit of every high byte cleared (``translate`` keeps this at C speed)."""
    data = bytearray(rng.randbytes(2 * tokens))
    data[1::2] = bytes(data[1::2]).translate(_HIGH_BYTE_MASK)
    return bytes(data)


def write_token_dataset(
    store: Any, shards: int, tokens: int, seed: int = 0
) -> list[dict[str, Any]]:
    """Write ``shards`` shards of ``tokens`` tokens and ``index.json`` into ``store``."""
    rng = random.Random(seed)
    index = []
    for i in range(shards):
        key = f"shard-{i:05d}.bin"
        store.put(key, token_shard(rng, tokens))
        index.append({"key": key, "tokens": tokens})
    store.put(
        "index.json", json.dumps({"vocab": VOCAB, "dtype": "uint16", "shards": index}).encode()
    )
    return index


class TokenData:
    """Every shard of a dataset in memory, as one token stream.

    Raises:
        FileNotFoundError: no shards at ``url``.
    """

    def __init__(self, url: str) -> None:
        store = open_store(url)
        try:
            try:
                index = json.loads(store.get("index.json"))
                keys = [s["key"] for s in index["shards"]]
            except Exception:  # no index: every shard-*.bin, in order
                keys = sorted(o.key for o in store.iter_list("shard-"))
            if not keys:
                raise FileNotFoundError(f"no token shards (shard-*.bin) at {url}")
            parts = [torch.frombuffer(bytearray(store.get(k)), dtype=torch.int16) for k in keys]
        finally:
            store.close()
        self.tokens = torch.cat(parts).to(torch.int64) & 0x7FFF
        self.url = url

    def batch(self, seed: int, step: int, rank: int, batch: int, length: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(hash((seed, step, rank)) & 0x7FFFFFFF)
        if self.tokens.numel() <= length:
            raise ValueError(f"{self.url}: {self.tokens.numel()} tokens, fewer than one sequence")
        starts = torch.randint(0, self.tokens.numel() - length, (batch,), generator=gen)
        return torch.stack([self.tokens[s : s + length] for s in starts.tolist()])
