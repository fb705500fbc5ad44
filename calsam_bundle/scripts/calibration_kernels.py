"""Compiled binning of top-label confidences, the inner loop of ECE, MCE and reliability diagrams.

``bin_sums(prob, label, mask, n_bins)`` reads every voxel once and adds it to its equal-width bin:

- ``prob`` ``(K, N)`` float32 or float64, ``label`` ``(K, N)`` bool, ``mask`` ``(K, N)`` bool or ``None``;
- returns ``count`` and ``correct`` ``(K, n_bins)`` int64 and ``conf_sum`` ``(K, n_bins)`` float64.

Why compiled loops: a tensor formulation needs about eight full passes over the volume (``1 - p``, the
maximum, the comparison with the label, the bin index, its clamp, three bincounts) and allocates as many
volume-sized temporaries. On a 240 x 240 x 155 x 3 volume those passes cost 5 to 10 times the time of one
fused loop on the 2-core development machine. The loops also skip voxels outside ``mask`` where they lie,
so a voxel set needs no gather, and only voxels inside it must hold probabilities.

Two loops. float32 probabilities with at most ``calibration_packed_kernel.MAX_BINS`` bins, the usual case,
take the vectorised loop of ``calibration_packed_kernel``. Other inputs take the scatter loop here, which
adds each voxel to its bin in memory and works for any bin count and for float64.

Exactness. For float32 ``prob`` the confidence ``c = max(p, 1 - p)`` is computed in float32, as the tensor code
in ``calibration.py`` does, and lies in [0.5, 1]. There every float32 value is an integer multiple of
``2**-24``. Both loops add the integers ``c * 2**24``. Their sum is exact while a bin's sum
stays below 2**53, that is for fewer than 2**29 voxels per bin, so the confidence sums do not depend on the
order of the voxels or on the loop. For float64 ``prob`` the sums are float64. The bin of ``c`` is
``floor(c * n_bins)`` computed in float64, which is exact for float32 ``c``, with ``c = 1`` put in the last bin.

Speed of the scatter loop. Voxels alternate between two accumulator rows, so two consecutive voxels in the
same bin do not wait for each other's memory update. Without that, background voxels, nearly all in the last
bin, would form one long dependency chain. Correctness and the bin share one counter index
(``2 * bin + correct``), which saves an update per voxel.

``numba`` compiles both loops on first use and caches the machine code beside this file (or in
``NUMBA_CACHE_DIR``). It is imported only then, and without numba the same sums come from numpy bincounts,
several times slower, so an environment without it (MONAI Label's) still evaluates.
"""

from __future__ import annotations

import contextlib
import functools
import logging

import numpy as np

from . import calibration_packed_kernel

logger = logging.getLogger(__name__)

# c * 2**24 is an integer for every float32 c in [0.5, 1].
_FLOAT32_SCALE = float(1 << 24)
_LANES = 2
# Voxels per parallel task: large enough that a task's start-up cost is negligible, small enough that a
# BraTS volume (8.9 million voxels per channel) splits into several tasks per channel for two or more threads.
_CHUNK_VOXELS = 1 << 20
# ``range`` until ``_kernels`` imports numba and swaps in ``numba.prange``, so this module imports without numba.
_prange = range


def bin_sums(
    prob: np.ndarray, label: np.ndarray, mask: np.ndarray | None, n_bins: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return ``count``, ``conf_sum`` and ``correct`` per channel and bin; see the module docstring.

    Raises:
        ValueError: a probability is NaN or outside [0, 1]; the message gives the first such value.
    """
    n_channels = prob.shape[0]
    label = np.ascontiguousarray(label).view(np.uint8)
    use_mask = mask is not None
    mask = np.ascontiguousarray(mask).view(np.uint8) if use_mask else np.ones((n_channels, 0), dtype=np.uint8)
    prob = np.ascontiguousarray(prob)
    if prob.dtype not in (np.float32, np.float64):
        raise TypeError(f"prob must be float32 or float64 for binning, got {prob.dtype}; convert it first.")
    if n_channels == 0:  # the loops split their work per channel
        empty = np.zeros((0, n_bins), dtype=np.int64)
        return empty, empty.astype(np.float64), empty.copy()
    kernels = _kernels()
    if kernels is None:
        return _numpy_bin_sums(prob, label, mask if use_mask else None, n_bins)
    chunks = max(1, -(-prob.shape[1] // _CHUNK_VOXELS))
    bad = np.full(n_channels * chunks, -1, dtype=np.int64)
    arguments = (prob, label, mask, use_mask, n_bins, chunks, bad)
    if prob.dtype == np.float32 and n_bins <= calibration_packed_kernel.MAX_BINS:
        sums = _packed_sums(kernels[1], *arguments)
    else:
        sums = _scatter_sums(kernels[0], *arguments)
    if (bad >= 0).any():
        first = int(bad[bad >= 0].min())
        raise invalid_probability(prob.reshape(-1)[first], first)
    return sums


def _packed_sums(kernel, prob, label, mask, use_mask, n_bins, chunks, bad):
    """Run the packed loop and sum its per-task rows per channel."""
    n_channels = prob.shape[0]
    count, correct = (np.zeros((n_channels * chunks, n_bins), dtype=np.int64) for _ in range(2))
    conf = np.zeros((n_channels * chunks, n_bins), dtype=np.float64)
    with _threads_like_torch():
        kernel(prob, label, mask, use_mask, n_bins, _CHUNK_VOXELS, count, correct, conf, bad)
    count, conf, correct = (array.reshape(n_channels, chunks, n_bins).sum(axis=1) for array in (count, conf, correct))
    return count, conf / _FLOAT32_SCALE, correct


def _scatter_sums(kernel, prob, label, mask, use_mask, n_bins, chunks, bad):
    """Run the scatter loop and sum its per-task, per-lane rows per channel."""
    n_channels = prob.shape[0]
    scale = _FLOAT32_SCALE if prob.dtype == np.float32 else 1.0
    hist = np.zeros((n_channels * chunks, _LANES, 2 * n_bins), dtype=np.int64)
    conf = np.zeros((n_channels * chunks, _LANES, n_bins), dtype=np.float64)
    with _threads_like_torch():
        kernel(prob, label, mask, use_mask, n_bins, scale, _CHUNK_VOXELS, hist, conf, bad)
    conf_sum = conf.reshape(n_channels, chunks * _LANES, n_bins).sum(axis=1) / scale
    pairs = hist.reshape(n_channels, chunks * _LANES, n_bins, 2).sum(axis=1)
    return pairs.sum(axis=2), conf_sum, pairs[:, :, 1].copy()


def invalid_probability(value, flat_index: int) -> ValueError:
    """Return the error for the first voxel of a set that holds no probability (NaN or outside [0, 1])."""
    # str() of a numpy scalar prints a float32 at its own precision, and format() would widen it to float64.
    value = str(np.asarray(value)[()])
    return ValueError(
        f"prob must contain probabilities in [0, 1], got the value {value} at flat index {flat_index}; "
        "apply a sigmoid to logits first."
    )


@contextlib.contextmanager
def _threads_like_torch():
    """Run numba with as many threads as torch uses, and leave torch's thread count as it was.

    numba's OpenMP threading layer shares torch's libgomp. Its first parallel call starts
    ``NUMBA_NUM_THREADS`` workers (one per core) and sets that number as the OpenMP default, which torch reads
    as its own thread count. Without the restore, a training run with one torch thread used two threads for
    every step after its first validation. Two such runs on two cores then spent most of their time spinning at
    OpenMP barriers, and their epochs took 5 to 8 times longer.
    """
    import numba
    import torch

    torch_threads = torch.get_num_threads()
    numba.set_num_threads(max(1, min(torch_threads, numba.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        if torch.get_num_threads() != torch_threads:
            torch.set_num_threads(torch_threads)


@functools.cache
def _kernels():
    """Compile both loops on first use or load them from numba's cache, or return ``None`` without numba."""
    global _prange
    try:
        import numba
    except ImportError:
        logger.warning("numba is not installed: calibration bins use numpy, several times slower (pip install numba).")
        return None
    _prange = numba.prange
    return numba.njit(cache=True, nogil=True, parallel=True)(_accumulate), calibration_packed_kernel.compile_loop(numba)


def _numpy_bin_sums(prob, label, mask, n_bins):
    """Compute the same sums with numpy, for environments without numba (MONAI Label's, for one)."""
    valid = (prob >= 0) & (prob <= 1)  # NaN fails the comparisons too
    if mask is not None:
        valid |= mask == 0  # as in the compiled loops, only the voxel set must hold probabilities
    if not valid.all():
        bad = int(np.flatnonzero(~valid)[0])
        raise invalid_probability(prob.reshape(-1)[bad], bad)
    n_channels = prob.shape[0]
    count = np.zeros((n_channels, n_bins), dtype=np.int64)
    conf_sum = np.zeros((n_channels, n_bins))
    correct = np.zeros((n_channels, n_bins), dtype=np.int64)
    for k in range(n_channels):
        p = prob[k] if mask is None else prob[k][mask[k].astype(bool)]
        y = label[k] if mask is None else label[k][mask[k].astype(bool)]
        confidence = np.maximum(p, 1 - p)  # in the dtype of prob, as the compiled loop computes it
        index = np.minimum((confidence.astype(np.float64) * n_bins).astype(np.int64), n_bins - 1)
        count[k] = np.bincount(index, minlength=n_bins)
        conf_sum[k] = np.bincount(index, weights=confidence.astype(np.float64), minlength=n_bins)
        correct[k] = np.bincount(index[(p >= 0.5) == y.astype(bool)], minlength=n_bins)
    return count, conf_sum, correct


def _accumulate(prob, label, mask, use_mask, n_bins, scale, chunk, hist, conf, bad):
    """Add every voxel to the ``hist`` and ``conf`` rows of its (channel, chunk) task, in parallel over tasks.

    ``bad[task]`` receives the flat index of the task's first invalid probability, which stops that task.
    """
    one = prob.dtype.type(1.0)
    half = prob.dtype.type(0.5)
    n_channels, n_voxels = prob.shape
    chunks = hist.shape[0] // n_channels
    for task in _prange(n_channels * chunks):
        k = task // chunks
        start = (task % chunks) * chunk
        probs, labels = prob[k], label[k]
        for i in range(start, min(start + chunk, n_voxels)):
            if use_mask and mask[k, i] == 0:
                continue
            q = probs[i]
            if not (q >= 0 and q <= 1):  # NaN fails both comparisons
                bad[task] = k * n_voxels + i
                break
            c = max(q, one - q)
            wide = np.float64(c)
            b = min(int(wide * n_bins), n_bins - 1)
            correct = np.int64(q >= half) ^ np.int64(labels[i] != 0) ^ 1
            lane = i & 1
            hist[task, lane, 2 * b + correct] += 1
            conf[task, lane, b] += wide * scale
