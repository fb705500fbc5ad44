"""Embedding cache: key coverage, reuse, damaged entries, concurrent writers, sizes and the memory-mapped view."""

import logging
import multiprocessing
from pathlib import Path

import numpy as np
import pytest
import torch

from scripts.embedding_store import EmbeddingStore, MappedEmbeddings

# The concurrency test's spawned children import this module. MONAI and the SAM network are imported inside the
# tests that use them, so each child imports only torch, numpy and the store.

IMAGE_SIZE = 64  # entries of shape (256, 4, 4)
ENTRY_SHAPE = (256, 4, 4)


class CountingEncoder:
    """Stand-in for ``CalSAMNet``: a deterministic encoder that counts the slices it embeds."""

    def __init__(self, image_size: int = IMAGE_SIZE, encoder_sha256: str = "a" * 64) -> None:
        self.image_size = image_size
        self.encoder_sha256 = encoder_sha256
        self.encoded = 0

    def encode(self, slices: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        self.encoded += len(slices)
        side = self.image_size // 16
        pooled = torch.nn.functional.adaptive_avg_pool2d(slices.float(), side)  # (B, 3, side, side)
        channel = torch.arange(256, dtype=torch.float32).view(1, 256, 1, 1, 1) / 256
        # Scaling by the channel index gives every channel different values, so a mix-up of channels shows.
        return (pooled.unsqueeze(1) * (1.0 + channel)).sum(dim=2) / 3.0 + 1e-3


def _slices(count: int = 5, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 3, 20, 24), generator=generator).float()


def _entry_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.npy"))


def test_key_same_for_same_input():
    from monai.data import MetaTensor

    store = EmbeddingStore(CountingEncoder())
    slice_255 = _slices(1)[0]
    assert store.key(slice_255) == store.key(slice_255.clone())
    assert store.key(slice_255) == store.key(MetaTensor(slice_255.clone()))
    assert store.key(slice_255) == store.key(slice_255.to(torch.uint8))


def test_key_changes_with_one_pixel():
    store = EmbeddingStore(CountingEncoder())
    slice_255 = _slices(1)[0]
    changed = slice_255.clone()
    changed[2, 7, 11] += 1
    assert store.key(changed) != store.key(slice_255)


def test_key_changes_with_image_size():
    slice_255 = _slices(1)[0]
    small = EmbeddingStore(CountingEncoder(image_size=64))
    large = EmbeddingStore(CountingEncoder(image_size=128))
    assert small.key(slice_255) != large.key(slice_255)


def test_key_changes_with_encoder_weights():
    from scripts.network import CalSAMNet

    slice_255 = _slices(1)[0]
    network = CalSAMNet("small", 64, init_seed=0)
    edited = CalSAMNet("small", 64, init_seed=0)
    with torch.no_grad():
        edited.sam.image_encoder.patch_embed.proj.weight[0, 0, 0, 0] += 1e-3
    same = CalSAMNet("small", 64, init_seed=0)
    assert EmbeddingStore(network).key(slice_255) != EmbeddingStore(edited).key(slice_255)
    assert EmbeddingStore(network).key(slice_255) == EmbeddingStore(same).key(slice_255)


def test_key_changes_with_dtype():
    slice_255 = _slices(1)[0]
    network = CountingEncoder()
    assert EmbeddingStore(network, dtype="float16").key(slice_255) != EmbeddingStore(network, dtype="float32").key(
        slice_255
    )


def test_reused_entry_equals_computed(tmp_path):
    from scripts.network import CalSAMNet

    network = CalSAMNet("small", 64, init_seed=0)
    slices = _slices(3)
    direct = network.encode(slices)
    first = EmbeddingStore(network, tmp_path, dtype="float16")
    computed = first.get(slices)
    second = EmbeddingStore(network, tmp_path, dtype="float16")
    reused = second.get(slices)
    assert (first.computed, first.reused) == (3, 0)
    assert (second.computed, second.reused) == (0, 3)
    assert len(_entry_files(tmp_path)) == 3
    assert torch.equal(reused, computed)
    # float16 keeps 11 significant bits: a relative error of at most 2^-11 for normal values.
    torch.testing.assert_close(reused, direct, rtol=2**-11, atol=1e-7)


def test_float32_entry_equals_encoder_output(tmp_path):
    from scripts.network import CalSAMNet

    network = CalSAMNet("small", 64, init_seed=0)
    slices = _slices(2)
    EmbeddingStore(network, tmp_path, dtype="float32").get(slices)
    reused = EmbeddingStore(network, tmp_path, dtype="float32").get(slices)
    assert torch.equal(reused, network.encode(slices))


def test_memory_layer_avoids_encoder():
    network = CountingEncoder()
    store = EmbeddingStore(network)
    slices = _slices(4)
    first = store.get(slices)
    second = store.get(slices[[2, 0]])
    assert network.encoded == 4
    assert torch.equal(second, first[[2, 0]])


def test_stray_temporary_file_not_served(tmp_path):
    network = CountingEncoder()
    store = EmbeddingStore(network, tmp_path)
    slices = _slices(1)
    key = store.key(slices[0])
    folder = tmp_path / key[:2]
    folder.mkdir()
    # What a writer killed before its rename leaves: a temporary file beside the entry path, no entry.
    np.save(folder / "tmpkilled.npy.tmp", np.full(ENTRY_SHAPE, 7.0, dtype=np.float16))
    result = store.get(slices)
    assert network.encoded == 1
    assert torch.equal(result, network.encode(slices).to(torch.float16).float())
    assert (folder / f"{key}.npy").is_file()


def test_truncated_entry_recomputed(tmp_path, caplog):
    network = CountingEncoder()
    slices = _slices(2)
    expected = EmbeddingStore(network, tmp_path).get(slices)
    path = _entry_files(tmp_path)[0]
    path.write_bytes(path.read_bytes()[:-100])
    store = EmbeddingStore(network, tmp_path)
    with caplog.at_level(logging.WARNING, logger="scripts.embedding_store"):
        result = store.get(slices)
    assert store.computed == 1
    assert "unreadable embedding cache entry" in caplog.text
    assert torch.equal(result, expected)
    assert np.load(path).shape == ENTRY_SHAPE


def test_empty_entry_recomputed(tmp_path):
    network = CountingEncoder()
    slices = _slices(1)
    expected = EmbeddingStore(network, tmp_path).get(slices)
    _entry_files(tmp_path)[0].write_bytes(b"")
    store = EmbeddingStore(network, tmp_path)
    assert torch.equal(store.get(slices), expected)
    assert store.computed == 1


def test_wrong_shape_entry_recomputed(tmp_path, caplog):
    network = CountingEncoder()
    slices = _slices(1)
    store = EmbeddingStore(network, tmp_path)
    path = tmp_path / store.key(slices[0])[:2] / f"{store.key(slices[0])}.npy"
    path.parent.mkdir()
    np.save(path, np.zeros((256, 2, 2), dtype=np.float16))
    with caplog.at_level(logging.WARNING, logger="scripts.embedding_store"):
        result = store.get(slices)
    assert store.computed == 1
    assert "of shape (256, 2, 2)" in caplog.text
    assert result.shape == (1, *ENTRY_SHAPE)


def test_writer_killed_mid_write_leaves_nothing(tmp_path, monkeypatch):
    network = CountingEncoder()
    store = EmbeddingStore(network, tmp_path)
    slices = _slices(1)

    def save_half_then_die(stream, array):
        stream.write(b"\x93NUMPY partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "save", save_half_then_die)
    with pytest.raises(KeyboardInterrupt):
        store.get(slices)
    monkeypatch.undo()
    assert list(tmp_path.rglob("*")) == [tmp_path / store.key(slices[0])[:2]]
    fresh = EmbeddingStore(network, tmp_path)
    fresh.get(slices)
    assert fresh.computed == 1


def _write_concurrently(cache_dir: str, barrier, result_path: str) -> None:
    """Embed the same slices as the sibling process, starting together, and save the result (child process)."""
    store = EmbeddingStore(CountingEncoder(), cache_dir, batch_size=1)
    slices = _slices(12)
    barrier.wait(timeout=60)
    np.save(result_path, store.get(slices).numpy())


def test_concurrent_writers_leave_valid_entries(tmp_path):
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    results = [tmp_path / f"result{index}.npy" for index in range(2)]
    workers = [
        context.Process(target=_write_concurrently, args=(str(tmp_path / "cache"), barrier, str(path)))
        for path in results
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert [worker.exitcode for worker in workers] == [0, 0]

    expected = CountingEncoder().encode(_slices(12)).to(torch.float16).float().numpy()
    for path in results:
        assert np.array_equal(np.load(path), expected)
    entries = _entry_files(tmp_path / "cache")
    assert len(entries) == 12
    assert not list((tmp_path / "cache").rglob("*.tmp"))
    reader = EmbeddingStore(CountingEncoder(), tmp_path / "cache")
    assert np.array_equal(reader.get(_slices(12)).numpy(), expected)
    assert reader.computed == 0


def test_stats_per_volume_sizes(caplog):
    store = EmbeddingStore(CountingEncoder(), dtype="float16")
    with caplog.at_level(logging.INFO, logger="scripts.embedding_store"):
        store.get(_slices(5), name="case_a")
        store.get(_slices(3, seed=1)[:2], name="case_b")
        store.get(_slices(5)[:2])
    stats = store.stats()
    megabytes = 256 * 4 * 4 * 2 / 1e6  # one float16 (256, 4, 4) entry
    assert stats["megabytes_per_slice"] == pytest.approx(megabytes)
    assert [record["name"] for record in stats["per_volume"]] == ["case_a", "case_b", "volume 3"]
    assert [record["slices"] for record in stats["per_volume"]] == [5, 2, 2]
    assert [record["computed"] for record in stats["per_volume"]] == [5, 2, 0]
    assert stats["per_volume"][0]["megabytes"] == pytest.approx(5 * megabytes)
    assert (stats["slices_computed"], stats["slices_reused"], stats["slices"]) == (7, 2, 9)
    assert stats["memory_entries"] == 7
    assert stats["memory_megabytes"] == pytest.approx(7 * megabytes)
    assert "Embeddings of case_a: 5 slices, 0.0 MB in float16 (5 computed, 0 reused)." in caplog.text


def test_stats_float32_doubles_size():
    assert EmbeddingStore(CountingEncoder(), dtype="float32").megabytes_per_slice == pytest.approx(256 * 16 * 4 / 1e6)


def test_memory_map_view_matches_tensor(tmp_path):
    network = CountingEncoder()
    slices = _slices(5)
    eager = EmbeddingStore(network, tmp_path).get(slices)
    mapped_store = EmbeddingStore(network, tmp_path, memory_map=True)
    view = mapped_store.get(slices)
    assert isinstance(view, MappedEmbeddings)
    assert mapped_store.computed == 0
    assert mapped_store.stats()["memory_entries"] == 0
    assert len(view) == 5
    assert view.shape == (5, *ENTRY_SHAPE)
    assert torch.equal(view[1:4], eager[1:4])
    assert torch.equal(view[torch.tensor([4, 0])], eager[[4, 0]])
    assert torch.equal(view[torch.tensor([True, False, False, True, False])], eager[[0, 3]])
    assert torch.equal(view[2], eager[2])
    assert view[5:].shape == (0, *ENTRY_SHAPE)


def test_memory_map_computes_missing_entries(tmp_path):
    network = CountingEncoder()
    slices = _slices(3)
    view = EmbeddingStore(network, tmp_path, memory_map=True).get(slices)
    assert network.encoded == 3
    assert torch.equal(view[0:3], network.encode(slices).to(torch.float16).float())


def test_memory_map_needs_cache_dir():
    with pytest.raises(ValueError, match="needs a cache_dir"):
        EmbeddingStore(CountingEncoder(), None, memory_map=True)


def test_invalid_settings_rejected():
    with pytest.raises(ValueError, match="bfloat16"):
        EmbeddingStore(CountingEncoder(), dtype="bfloat16")
    with pytest.raises(ValueError, match="batch_size"):
        EmbeddingStore(CountingEncoder(), batch_size=0)
    with pytest.raises(ValueError, match=r"\(T, 3, H, W\)"):
        EmbeddingStore(CountingEncoder()).get(torch.zeros(3, 20, 24))


def test_metatensor_input_gives_plain_output():
    from monai.data import MetaTensor

    store = EmbeddingStore(CountingEncoder())
    result = store.get(MetaTensor(_slices(2)))
    assert type(result) is torch.Tensor
    assert result.dtype == torch.float32
