"""On-disk cache of a backbone's frozen front, per image, so a re-fine-tune computes features only for new images.

A store is one directory, ``.cache/features/<key>/``, where the key hashes everything the
features depend on except the image: the frozen weights, the preprocessing, the cut, the
stored image shape and whether the image was mirrored. Inside, each shard is a pair

- ``<shard>.npy``: float16 features, shape (k, *feature_shape), memory-mapped on read;
- ``<shard>.keys``: the k image sha256s, one per line, written last, so a shard without its
  keys is an interrupted write and is ignored.

Shards are only ever added, never rewritten, so concurrent writers cannot corrupt a store
(at worst both compute the same images; the first shard read wins). Imports only torch
and numpy, like the training core.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tasks.model.network import Preprocessing, state_digest

log = logging.getLogger(__name__)

#: Images per shard written at once: bounds the memory of one write and the loss of an interrupted one.
SHARD_IMAGES = 2048


def cache_key(
    front: nn.Module, preprocessing: Preprocessing, cut: str, stored_shape: tuple[int, ...], mirrored: bool
) -> str:
    """What cached features are valid for: the same sha256 gives the same features under the same key."""
    payload = {
        "weights": state_digest(front),
        "preprocessing": asdict(preprocessing),
        "cut": cut,
        # prepare's stored size decides the pixels an image sha256 stands for.
        "stored_shape": list(stored_shape),
        "mirrored": mirrored,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


class FeatureView:
    """Features of a list of images, in that order, gathered from the shards on each index."""

    def __init__(self, shards: list[np.ndarray], shard_of: np.ndarray, row_of: np.ndarray) -> None:
        self.shards, self.shard_of, self.row_of = shards, shard_of, row_of
        self.item_shape = tuple(shards[0].shape[1:]) if shards else ()

    def __len__(self) -> int:
        return len(self.shard_of)

    def __getitem__(self, idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx)
        shard_of, row_of = self.shard_of[idx], self.row_of[idx]
        out = np.empty((len(idx), *self.item_shape), dtype=np.float16)
        for shard in np.unique(shard_of):
            hit = shard_of == shard
            out[hit] = self.shards[shard][row_of[hit]]
        return out


class FeatureStore:
    """One cache directory: which images it holds, adding shards, and views in a given order."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.shards: list[np.ndarray] = []
        self.index: dict[str, tuple[int, int]] = {}
        for keys in sorted(directory.glob("*.keys")):
            self._register(np.load(keys.with_suffix(".npy"), mmap_mode="r", allow_pickle=False), keys.read_text())

    def _register(self, features: np.ndarray, keys_text: str) -> None:
        shard = len(self.shards)
        self.shards.append(features)
        for row, sha in enumerate(keys_text.split()):
            self.index.setdefault(sha, (shard, row))

    def missing(self, hashes: list[str]) -> list[int]:
        """Positions in ``hashes`` whose features are not stored yet."""
        return [i for i, sha in enumerate(hashes) if sha not in self.index]

    def add(self, hashes: list[str], features: np.ndarray) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
        data, keys = self.directory / f"{name}.npy", self.directory / f"{name}.keys"
        tmp = self.directory / f".{name}.tmp"
        np.save(tmp.with_suffix(".npy"), features.astype(np.float16, copy=False))
        os.replace(tmp.with_suffix(".npy"), data)
        text = "\n".join(hashes) + "\n"
        tmp.write_text(text, encoding="ascii")
        os.replace(tmp, keys)
        self._register(np.load(data, mmap_mode="r", allow_pickle=False), text)

    def view(self, hashes: list[str]) -> FeatureView:
        missing = self.missing(hashes)
        if missing:
            raise KeyError(f"{len(missing)} images have no cached features in {self.directory}")
        where = np.array([self.index[sha] for sha in hashes], dtype=np.int64).reshape(-1, 2)
        return FeatureView(self.shards, where[:, 0], where[:, 1])


@torch.inference_mode()
def compute_features(
    front: nn.Module,
    preprocess: Callable[[torch.Tensor], torch.Tensor],
    images: np.ndarray,
    mirrored: bool,
    batch_size: int,
    device: torch.device,
) -> np.ndarray:
    """The front's float16 output for uint8 images (N, H, W, 3), mirrored left-right when asked.

    Mirroring the preprocessed input is exactly what ``augment``'s hflip does to a live batch.
    """
    front.eval()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    out = []
    for start in range(0, len(images), batch_size):
        x = preprocess(torch.from_numpy(np.asarray(images[start : start + batch_size])).to(device))
        with autocast:
            out.append(front(x.flip(-1) if mirrored else x).to(torch.float16).cpu())
    return torch.cat(out).numpy()


def ensure_features(
    store: FeatureStore,
    hashes: list[str],
    images: np.ndarray,
    compute: Callable[[np.ndarray], np.ndarray],
    share: tuple[int, int] = (0, 1),
) -> int:
    """Compute and store the features of the images in ``hashes`` the store lacks; return how many it lacked.

    ``share`` (rank, processes): this process computes every processes-th of them from its rank, the
    other processes the rest, each in shards of its own.
    """
    missing = store.missing(hashes)
    mine = missing[share[0] :: share[1]]
    started = time.monotonic()
    for start in range(0, len(mine), SHARD_IMAGES):
        positions = mine[start : start + SHARD_IMAGES]
        store.add([hashes[i] for i in positions], compute(images[np.asarray(positions)]))
        log.info(
            "features: %d/%d new images computed (%.0f img/s)",
            start + len(positions), len(mine), (start + len(positions)) / (time.monotonic() - started),
        )  # fmt: skip
    return len(missing)
