"""Frozen-encoder embeddings computed once per slice and reused, in memory and optionally on disk.

The image encoder never changes during CalSAM training, so a slice's embedding depends only on the encoder's
input and weights. The cache key is a SHA-256 over

- the slice's ``(3, H, W)`` pixels on the [0, 255] scale. Preprocessing happens before the store receives a slice:
  the channels shown to SAM as RGB, the intensity percentiles and the rounding to integers are all in the
  pixel values, so changing any of them gives new keys;
- the encoder input size and SAM's pixel mean and std, which set the encoder input made from those pixels;
- the SHA-256 of the frozen image and prompt encoder weights (``CalSAMNet.encoder_sha256``);
- the storage dtype, so float16 and float32 stores can share one folder;
- ``KEY_FORMAT``, to be changed whenever the code that turns pixels into encoder input
  (``sam_input.slices_to_encoder_input``) changes.

Which slices are requested is the caller's choice: ``cases.prepare_case`` asks only for slices that contain a
region plus ``slice_margin`` neighbours, so the cache never holds the rest of a volume.

Disk entries are ``.npy`` files at ``<cache_dir>/<key[:2]>/<key>.npy``. Each is written to a unique temporary
name in the same folder and then renamed over the entry path, so a reader sees either a whole entry or none,
and two processes writing one key leave one whole entry. A killed writer leaves at most a ``*.tmp`` file,
which is never read and can be deleted while no run is writing. Entries are opened with
``np.load(mmap_mode="r")``, which checks the file length against the header before reading any data; a
truncated entry, or one of the wrong shape or dtype, is logged, recomputed and overwritten.

Note:
    Renames protect against a killed process, not against power loss: entries are not fsynced. A file cut
    short by a crash is caught by the length check; other damage of a full-length file would not be.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .atomic_files import temporary_sibling
from .sam_builder import PATCH_SIZE, PIXEL_MEAN, PIXEL_STD, PROMPT_EMBED_DIM

logger = logging.getLogger(__name__)

KEY_FORMAT = "calsam-embedding-v2"
_DTYPES = {"float16": torch.float16, "float32": torch.float32}
_BYTES_PER_MB = 1_000_000


class MappedEmbeddings:
    """Read-only ``(T, 256, h, w)`` float32 view of disk entries; indexing reads only the requested slices.

    It supports ``len``, ``shape`` and indexing with an int, a slice, a list or a 1-D integer or bool tensor,
    which is how ``slabs.SlabDataset`` and ``evaluator.predict_volume`` read prepared embeddings. Each read
    memory-maps the entry file and copies the slice out, so no file stays open between reads.

    Args:
        paths: entry files in slice order.
        entry_shape: ``(256, h, w)`` of every entry.
    """

    def __init__(self, paths: list[Path], entry_shape: tuple[int, int, int]) -> None:
        self.paths = list(paths)
        self.entry_shape = tuple(entry_shape)
        self.dtype = torch.float32

    @property
    def shape(self) -> torch.Size:
        """``(T, 256, h, w)``."""
        return torch.Size((len(self.paths), *self.entry_shape))

    def __len__(self) -> int:
        return len(self.paths)

    def _read(self, position: int) -> torch.Tensor:
        return torch.from_numpy(np.array(np.load(self.paths[position], mmap_mode="r"), dtype=np.float32))

    def __getitem__(self, index) -> torch.Tensor:
        positions = torch.arange(len(self.paths))[index]
        if positions.ndim == 0:
            return self._read(int(positions))
        rows = positions.reshape(-1).tolist()
        if not rows:
            return torch.zeros((0, *self.entry_shape))
        return torch.stack([self._read(row) for row in rows])

    def __repr__(self) -> str:
        return f"MappedEmbeddings(slices={len(self.paths)}, entry_shape={self.entry_shape})"


class EmbeddingStore:
    """Compute, keep and return frozen embeddings of ``(3, H, W)`` slices on the [0, 255] scale.

    Args:
        network: a ``CalSAMNet``; its ``encode``, ``image_size`` and ``encoder_sha256`` are used.
        cache_dir: folder for persistent entries, or ``None`` to keep them in memory only.
        dtype: storage precision, ``"float16"`` (half the memory and disk) or ``"float32"``.
        batch_size: slices per encoder call; entries are written after every call, so a killed run keeps the
            batches it finished.
        keep_in_memory: also keep entries in RAM after computing or reading them. ``None`` (default) keeps
            them unless ``memory_map`` is set.
        memory_map: make ``get`` return a ``MappedEmbeddings`` view of the disk entries instead of a tensor, so
            prepared cases hold no embeddings in RAM. Needs ``cache_dir``. Use it when the embeddings of all
            cases exceed RAM: ViT-B at 1024 px stores 2.1 MB per slice in float16.
        progress: show a per-slice progress bar while a ``get`` call needs more than one encoder call.

    Raises:
        ValueError: on an unknown ``dtype``, a ``batch_size`` below 1, or ``memory_map`` without ``cache_dir``.
    """

    def __init__(
        self,
        network,
        cache_dir: str | None = None,
        dtype: str = "float16",
        batch_size: int = 8,
        keep_in_memory: bool | None = None,
        memory_map: bool = False,
        progress: bool = True,
    ) -> None:
        if dtype not in _DTYPES:
            raise ValueError(f"Embedding dtype must be one of {sorted(_DTYPES)}, got {dtype!r}.")
        if int(batch_size) < 1:
            raise ValueError(f"Embedding batch_size must be a positive number of slices, got {batch_size!r}.")
        if memory_map and not cache_dir:
            raise ValueError("memory_map=True reads embeddings from disk entries, so it needs a cache_dir; got None.")
        self.network = network
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.dtype_name = dtype
        self.dtype = _DTYPES[dtype]
        self.batch_size = int(batch_size)
        self.memory_map = bool(memory_map)
        self.keep_in_memory = (not self.memory_map) if keep_in_memory is None else bool(keep_in_memory)
        self.progress = bool(progress)
        self._memory: dict[str, torch.Tensor] = {}
        self._volumes: list[dict] = []
        self.computed = 0
        self.reused = 0
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)

    @property
    def entry_shape(self) -> tuple[int, int, int]:
        """``(256, h, w)`` of one slice's embedding, ``h = w = image_size / 16``."""
        side = self.network.image_size // PATCH_SIZE
        return (PROMPT_EMBED_DIM, side, side)

    @property
    def megabytes_per_slice(self) -> float:
        """Size of one stored embedding in MB (10^6 bytes)."""
        c, h, w = self.entry_shape
        return c * h * w * torch.finfo(self.dtype).bits / 8 / _BYTES_PER_MB

    def key(self, slice_255: torch.Tensor) -> str:
        """Cache key of one ``(3, H, W)`` slice; the module docstring lists what it covers."""
        digest = hashlib.sha256()
        pixels = slice_255.detach().as_subclass(torch.Tensor).to(torch.float32).cpu().contiguous()
        digest.update(KEY_FORMAT.encode())
        digest.update(str(tuple(pixels.shape)).encode())
        digest.update(pixels.numpy().tobytes())
        digest.update(f"image_size={self.network.image_size};mean={PIXEL_MEAN};std={PIXEL_STD}".encode())
        digest.update(self.network.encoder_sha256.encode())
        digest.update(f"dtype={self.dtype_name}".encode())
        return digest.hexdigest()

    def _path(self, key: str) -> Path:
        return self.cache_dir / key[:2] / f"{key}.npy"

    def _open_entry(self, key: str) -> np.ndarray | None:
        """Memory-map the disk entry of ``key``; ``None`` when it is missing or unusable."""
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as error:
            logger.warning("Ignoring unreadable embedding cache entry %s (%s); recomputing it.", path, error)
            return None
        expected_dtype = np.dtype(self.dtype_name)
        if array.shape != self.entry_shape or array.dtype != expected_dtype:
            logger.warning(
                "Ignoring embedding cache entry %s of shape %s and dtype %s, expected %s and %s; recomputing it.",
                path,
                array.shape,
                array.dtype,
                self.entry_shape,
                expected_dtype,
            )
            return None
        return array

    def _read(self, key: str) -> torch.Tensor | None:
        if key in self._memory:
            return self._memory[key]
        if self.cache_dir is None:
            return None
        array = self._open_entry(key)
        if array is None:
            return None
        tensor = torch.from_numpy(np.array(array))
        if self.keep_in_memory:
            self._memory[key] = tensor
        return tensor

    def _write(self, key: str, stored: torch.Tensor) -> None:
        if self.keep_in_memory:
            self._memory[key] = stored
        if self.cache_dir is None:
            return
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = temporary_sibling(path)
        try:
            with os.fdopen(handle, "wb") as stream:
                np.save(stream, stored.numpy())
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def _encode_and_write(self, slices_255: torch.Tensor, keys: list[str]) -> list[torch.Tensor]:
        """Encode ``slices_255`` in batches, writing each batch's entries as soon as it is done."""
        total = len(keys)
        outputs: list[torch.Tensor] = []
        # One encoder call would move the bar from 0 to done in one jump, so the bar appears only when there are
        # several calls, and only after 2 s, so fast encoders print nothing.
        show = self.progress and total > self.batch_size
        with tqdm(total=total, desc="Encoding slices", unit="slice", leave=False, disable=not show, delay=2) as bar:
            for start in range(0, total, self.batch_size):
                chunk = slices_255[start : start + self.batch_size]
                embeddings = self.network.encode(chunk, batch_size=self.batch_size).detach().cpu().to(self.dtype)
                for key, embedding in zip(keys[start : start + self.batch_size], embeddings):
                    stored = embedding.clone()
                    self._write(key, stored)
                    outputs.append(stored)
                bar.update(len(chunk))
        return outputs

    def get(self, slices_255: torch.Tensor, name: str | None = None) -> torch.Tensor | MappedEmbeddings:
        """Return embeddings of one volume's ``(T, 3, H, W)`` slices, encoding only the ones not cached.

        Args:
            slices_255: ``(T, 3, H, W)`` slices on the [0, 255] scale; a MONAI ``MetaTensor`` is read as a
                plain tensor.
            name: volume name for the log line and ``stats()``, such as the case id.

        Returns:
            ``(T, 256, h, w)`` float32 values of the stored precision: a tensor, or a ``MappedEmbeddings``
            view with ``memory_map``.

        Raises:
            ValueError: ``slices_255`` is not ``(T, 3, H, W)``.
        """
        if slices_255.ndim != 4 or slices_255.shape[1] != 3:
            raise ValueError(
                f"Slices must have shape (T, 3, H, W) on the [0, 255] scale, got {tuple(slices_255.shape)}."
            )
        # MetaTensor dispatch adds overhead to every encoder operation and its metadata is not needed here.
        slices_255 = slices_255.detach().as_subclass(torch.Tensor)
        keys = [self.key(slice_255) for slice_255 in slices_255]
        if self.memory_map:
            found = [self._open_entry(key) for key in keys]
        else:
            found = [self._read(key) for key in keys]
        missing = [index for index, entry in enumerate(found) if entry is None]
        if missing:
            computed = self._encode_and_write(slices_255[missing], [keys[index] for index in missing])
            for index, embedding in zip(missing, computed):
                found[index] = embedding
        self.computed += len(missing)
        self.reused += len(keys) - len(missing)
        self._record_volume(name, len(keys), len(missing))
        if self.memory_map:
            return MappedEmbeddings([self._path(key) for key in keys], self.entry_shape)
        if not found:
            return torch.zeros((0, *self.entry_shape))
        return torch.stack(found).to(torch.float32)

    def _record_volume(self, name: str | None, slices: int, computed: int) -> None:
        record = {
            "name": name if name is not None else f"volume {len(self._volumes) + 1}",
            "slices": slices,
            "computed": computed,
            "reused": slices - computed,
            "megabytes": slices * self.megabytes_per_slice,
        }
        self._volumes.append(record)
        logger.info(
            "Embeddings of %s: %d slices, %.1f MB in %s (%d computed, %d reused).",
            record["name"],
            slices,
            record["megabytes"],
            self.dtype_name,
            computed,
            slices - computed,
        )

    def stats(self) -> dict:
        """Summarise the store: slices computed and reused, total size, RAM held, and one record per volume.

        Returns:
            ``dtype``, ``megabytes_per_slice``, ``slices_computed``, ``slices_reused``, ``volumes``, ``slices``
            and ``megabytes`` (over all ``get`` calls), ``memory_entries`` and ``memory_megabytes`` (the RAM
            layer), and ``per_volume``: one dict per ``get`` call with ``name``, ``slices``, ``computed``,
            ``reused`` and ``megabytes``. Sizes are in MB of 10^6 bytes.
        """
        return {
            "dtype": self.dtype_name,
            "megabytes_per_slice": self.megabytes_per_slice,
            "slices_computed": self.computed,
            "slices_reused": self.reused,
            "volumes": len(self._volumes),
            "slices": sum(record["slices"] for record in self._volumes),
            "megabytes": sum(record["megabytes"] for record in self._volumes),
            "memory_entries": len(self._memory),
            "memory_megabytes": len(self._memory) * self.megabytes_per_slice,
            "per_volume": [dict(record) for record in self._volumes],
        }
