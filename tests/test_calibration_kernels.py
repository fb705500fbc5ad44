"""Compiled binning loops: the packed and scatter loops against numpy bincounts, edge values and errors."""

import numpy as np
import pytest

from scripts import calibration_kernels, calibration_packed_kernel

BLOCK = calibration_packed_kernel.BLOCK


@pytest.fixture
def small_chunks(monkeypatch):
    # Several parallel tasks per channel, and chunk ends that do not fall on block ends.
    monkeypatch.setattr(calibration_kernels, "_CHUNK_VOXELS", 2 * BLOCK + 300)


def _case(n_voxels, seed, dtype=np.float32):
    generator = np.random.default_rng(seed)
    prob = generator.random((3, n_voxels)).astype(dtype)
    prob[0, :BLOCK] = 1.0  # one full block at the largest confidence: the largest packed sums
    prob[1, :50] = 0.5
    prob[1, 50:100] = 0.0
    label = generator.random((3, n_voxels)) < prob
    mask = generator.random((3, n_voxels)) < 0.5
    mask[2, 3 * BLOCK : 9 * BLOCK] = False  # whole blocks outside the voxel set are skipped
    return prob, label, mask


def _assert_same(got, expected):
    # float32 confidences are multiples of 2**-24, so every float64 sum is exact in any order.
    for name, a, b in zip(("count", "conf_sum", "correct"), got, expected):
        np.testing.assert_array_equal(a, b, err_msg=name)


@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize("n_bins", [1, 2, 3, 10, 15, 16, 31, 32, 33, 100])
@pytest.mark.parametrize("masked", [False, True])
def test_compiled_loops_equal_numpy_bincounts(n_bins, masked):
    # n_bins up to 32 takes the packed loop, above it the scatter loop.
    prob, label, mask = _case(12 * BLOCK + 77, seed=n_bins)
    chosen = mask if masked else None
    expected = calibration_kernels._numpy_bin_sums(prob, label.view(np.uint8), chosen, n_bins)
    _assert_same(calibration_kernels.bin_sums(prob, label, chosen, n_bins), expected)


@pytest.mark.parametrize("n_bins", [10, 15])
def test_confidences_on_bin_edges_go_up(n_bins):
    # The float32 values nearest to each edge k / n_bins, and their neighbours on both sides.
    edges = np.arange(n_bins // 2, n_bins + 1) / n_bins
    nearest = edges.astype(np.float32)
    values = np.concatenate([nearest, np.nextafter(nearest, 0), np.nextafter(nearest, 2)]).clip(0.5, 1)
    prob = np.concatenate([values, 1 - values]).astype(np.float32)[None].repeat(2, axis=0)
    label = np.zeros_like(prob, dtype=bool)
    expected = calibration_kernels._numpy_bin_sums(prob, label.view(np.uint8), None, n_bins)
    _assert_same(calibration_kernels.bin_sums(prob, label, None, n_bins), expected)


def test_full_block_at_one_exact():
    prob = np.ones((1, 3 * BLOCK), dtype=np.float32)
    label = np.zeros((1, 3 * BLOCK), dtype=bool)
    label[0, ::3] = True
    count, conf_sum, correct = calibration_kernels.bin_sums(prob, label, None, 15)
    assert count[0, 14] == 3 * BLOCK
    assert count[0, :14].sum() == 0
    assert conf_sum[0, 14] == 3 * BLOCK
    assert correct[0, 14] == BLOCK


@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize("n_bins", [15, 40])
def test_invalid_outside_set_ignored(n_bins):
    prob, label, mask = _case(6 * BLOCK, seed=1)
    prob[1, 5000] = np.nan
    prob[2, 7000] = 1.5
    mask[1, 5000] = mask[2, 7000] = False
    expected = calibration_kernels._numpy_bin_sums(prob, label.view(np.uint8), mask, n_bins)
    _assert_same(calibration_kernels.bin_sums(prob, label, mask, n_bins), expected)


@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize("n_bins", [15, 40])
@pytest.mark.parametrize("masked", [False, True])
def test_first_invalid_probability_is_named(n_bins, masked):
    # Two bad values in different tasks: the message names the one at the lower flat index.
    prob, label, mask = _case(6 * BLOCK, seed=2)
    prob[2, 100] = -0.25
    prob[1, 9000] = np.nan
    mask[2, 100] = mask[1, 9000] = True
    with pytest.raises(ValueError, match=r"got the value nan at flat index 21288; apply a sigmoid"):
        calibration_kernels.bin_sums(prob, label, mask if masked else None, n_bins)
    prob[1, 9000] = 0.5
    with pytest.raises(ValueError, match=r"got the value -0.25 at flat index 24676;"):
        calibration_kernels.bin_sums(prob, label, mask if masked else None, n_bins)


def test_float64_takes_scatter_loop():
    # float64 confidences are no multiples of 2**-24, so the packed loop must not see them.
    prob, label, _ = _case(4 * BLOCK, seed=3, dtype=np.float64)
    prob[0, :10] = 0.5 + 2.0**-40
    got = calibration_kernels.bin_sums(prob, label, None, 15)
    expected = calibration_kernels._numpy_bin_sums(prob, label.view(np.uint8), None, 15)
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_allclose(got[1], expected[1], rtol=1e-13)
    np.testing.assert_array_equal(got[2], expected[2])


@pytest.mark.parametrize("n_bins", [10, 40])
def test_bool_byte_two_counts_true(n_bins):
    # A uint8 buffer viewed as bool may hold 2. numpy and torch read it as True, and so must the loops.
    prob = np.full((1, 4), 0.99, dtype=np.float32)
    twos = np.full((1, 4), 2, dtype=np.uint8).view(bool)
    ones = np.ones((1, 4), dtype=bool)
    _assert_same(
        calibration_kernels.bin_sums(prob, twos, twos, n_bins), calibration_kernels.bin_sums(prob, ones, ones, n_bins)
    )


def test_nan_under_mask_byte_two_named():
    prob = np.full((1, 4), 0.3, dtype=np.float32)
    prob[0, 2] = np.nan
    mask = np.full((1, 4), 2, dtype=np.uint8).view(bool)
    with pytest.raises(ValueError, match="got the value nan at flat index 2;"):
        calibration_kernels.bin_sums(prob, mask, mask, 15)


def test_no_channels_give_empty_sums():
    count, conf_sum, correct = calibration_kernels.bin_sums(
        np.zeros((0, 5), np.float32), np.zeros((0, 5), bool), None, 15
    )
    assert count.shape == conf_sum.shape == correct.shape == (0, 15)
