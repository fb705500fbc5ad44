"""Frozen-encoder embeddings computed once per slice and reused, in memory and optionally on disk.

The image encoder never changes during CalSAM training, so a slice's embedding depends only on the slice's
preprocessed pixels, the encoder input size and the encoder weights. The cache key hashes exactly those, so any
change of image content, preprocessing or weights gives a new key and an old entry is never served for it.
Disk entries are float16 ``.npy`` files written to a temporary name and renamed, so a killed run leaves either
a whole entry or none.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

_DTYPES = {"float16": torch.float16, "float32": torch.float32}


class EmbeddingStore:
    """Compute, keep and return frozen embeddings of ``(3, H, W)`` slices on the [0, 255] scale.

    Args:
        network: a ``CalSAMNet``; its ``encode`` and ``encoder_sha256`` are used.
        cache_dir: folder for persistent entries, or ``None`` to keep them in memory only.
        dtype: storage precision, ``"float16"`` (half the memory and disk) or ``"float32"``.
        batch_size: slices per encoder call.
        keep_in_memory: also keep entries in RAM after computing or reading them.
    """

    def __init__(
        self,
        network,
        cache_dir: str | None = None,
        dtype: str = "float16",
        batch_size: int = 8,
        keep_in_memory: bool = True,
    ) -> None:
        if dtype not in _DTYPES:
            raise ValueError(f"Embedding dtype must be one of {sorted(_DTYPES)}, got {dtype!r}.")
        self.network = network
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.dtype = _DTYPES[dtype]
        self.batch_size = int(batch_size)
        self.keep_in_memory = keep_in_memory
        self._memory: dict[str, torch.Tensor] = {}
        self.computed = 0
        self.reused = 0
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)

    def key(self, slice_255: torch.Tensor) -> str:
        """Cache key of one ``(3, H, W)`` slice: content, shape, encoder input size and encoder weights."""
        digest = hashlib.sha256()
        pixels = slice_255.detach().to(torch.float32).cpu().contiguous()
        digest.update(str(tuple(pixels.shape)).encode())
        digest.update(pixels.numpy().tobytes())
        digest.update(f"image_size={self.network.image_size}".encode())
        digest.update(self.network.encoder_sha256.encode())
        return digest.hexdigest()

    def _path(self, key: str) -> Path:
        return self.cache_dir / key[:2] / f"{key}.npy"

    def _read(self, key: str) -> torch.Tensor | None:
        if key in self._memory:
            return self._memory[key]
        if self.cache_dir is None:
            return None
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            array = np.load(path, mmap_mode="r")
            tensor = torch.from_numpy(np.array(array)).to(self.dtype)
        except (OSError, ValueError) as error:
            # A damaged entry is recomputed rather than trusted; renames make this rare.
            logger.warning("Ignoring unreadable embedding cache entry %s (%s); recomputing it.", path, error)
            return None
        if self.keep_in_memory:
            self._memory[key] = tensor
        return tensor

    def _write(self, key: str, embedding: torch.Tensor) -> None:
        stored = embedding.detach().to(self.dtype).cpu()
        if self.keep_in_memory:
            self._memory[key] = stored
        if self.cache_dir is None:
            return
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as stream:
                np.save(stream, stored.numpy())
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def get(self, slices_255: torch.Tensor) -> torch.Tensor:
        """Return ``(T, 256, h, w)`` embeddings of ``(T, 3, H, W)`` slices, encoding only the missing ones."""
        keys = [self.key(slice_255) for slice_255 in slices_255]
        found = [self._read(key) for key in keys]
        missing = [index for index, entry in enumerate(found) if entry is None]
        if missing:
            embeddings = self.network.encode(slices_255[missing], batch_size=self.batch_size).cpu()
            for index, embedding in zip(missing, embeddings):
                self._write(keys[index], embedding)
                found[index] = embedding.to(self.dtype)
        self.computed += len(missing)
        self.reused += len(keys) - len(missing)
        return torch.stack(found).to(torch.float32)
