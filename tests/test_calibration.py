"""Calibration metrics: hand-computed cases, MONAI agreement and an independent numpy reference."""

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.metrics import CalibrationErrorMetric

from scripts import calibration_kernels
from scripts.calibration import (
    NLL_EPS,
    adaptive_calibration_error,
    bin_statistics,
    brier_score,
    compute_calibration,
    expected_calibration_error,
    maximum_calibration_error,
    negative_log_likelihood,
)


def _random_case(n_channels=3, n_voxels=3000, n_bins=15, seed=0):
    """Random probabilities whose confidences keep 1e-3 away from every bin edge.

    MONAI bins ``(left, right]`` with its top edge stretched by float32 eps, and this module bins
    ``[left, right)``. Away from edges both put every voxel in the same bin.
    """
    generator = torch.Generator().manual_seed(seed)
    bin_index = torch.randint(n_bins // 2 + 1, n_bins, (n_channels, n_voxels), generator=generator)
    offset = 1e-3 + (1 - 2e-3) * torch.rand(n_channels, n_voxels, generator=generator)
    confidence = (bin_index + offset) / n_bins
    positive = torch.rand(n_channels, n_voxels, generator=generator) < 0.5
    prob = torch.where(positive, confidence, 1 - confidence).float()
    label = torch.rand(n_channels, n_voxels, generator=generator) < prob
    return prob, label


def test_ece_two_voxels_in_two_bins():
    # p = 0.9, y = 1: confidence 0.9, correct, bin 13. p = 0.3, y = 1: predicts 0, confidence 0.7, wrong,
    # bin 10. ECE = (1/2)|0.9 - 1| + (1/2)|0.7 - 0| = 0.05 + 0.35 = 0.4.
    prob = torch.tensor([[0.9, 0.3]], dtype=torch.float64)
    label = torch.tensor([[True, True]])
    assert expected_calibration_error(prob, label).item() == pytest.approx(0.4, abs=1e-12)


def test_ece_two_voxels_in_one_bin():
    # p = 0.9 (y = 1, correct) and p = 0.08 (y = 1, predicts 0, wrong) have confidences 0.9 and 0.92, both
    # in bin 13 = [0.8667, 0.9333). Mean confidence 0.91, accuracy 0.5, so ECE = |0.91 - 0.5| = 0.41.
    prob = torch.tensor([[0.9, 0.08]], dtype=torch.float64)
    label = torch.tensor([[True, True]])
    assert expected_calibration_error(prob, label).item() == pytest.approx(0.41, abs=1e-12)


def test_confidence_one_in_last_bin():
    # p = 1 and p = 0 both have confidence exactly 1.0, which belongs to the last bin [14/15, 1].
    bins = bin_statistics(torch.tensor([[1.0, 0.0]]), torch.tensor([[True, False]]), n_bins=15)
    assert bins["count"][0, 14].item() == 2
    assert bins["count"].sum().item() == 2


def test_confidence_on_edge_goes_up():
    # 0.75 * 20 = 15 exactly, so confidence 0.75 opens bin 15 of 20.
    bins = bin_statistics(torch.tensor([[0.75]]), torch.tensor([[True]]), n_bins=20)
    assert bins["count"][0, 15].item() == 1


def test_constant_background_probability():
    # Every voxel: p = 0.1, y = 0, so prediction 0 is correct with confidence 0.9, and ECE = 1 - 0.9.
    prob = torch.full((1, 40 * 40 * 20), 0.1)
    label = torch.zeros(1, 40 * 40 * 20, dtype=torch.bool)
    assert expected_calibration_error(prob, label).item() == pytest.approx(0.1, abs=1e-6)


def test_mce_hand_computed():
    # Bin 13 contains p = 0.9 (correct) and p = 0.08 (wrong): gap |0.91 - 0.5| = 0.41. Bin 9 contains p = 0.65
    # (y = 1, correct): gap 0.35. MCE = 0.41.
    prob = torch.tensor([[0.9, 0.08, 0.65]], dtype=torch.float64)
    label = torch.tensor([[True, True, True]])
    assert maximum_calibration_error(prob, label).item() == pytest.approx(0.41, abs=1e-12)


def test_ece_matches_monai():
    prob, label = _random_case()
    confidence = torch.maximum(prob, 1 - prob)
    correct = (prob >= 0.5) == label
    # MONAI bins the probability it is given against the label it is given, so it gets the top-label
    # confidence and the correctness to compute the same quantity.
    monai_metric = CalibrationErrorMetric(num_bins=15, metric_reduction="none")
    expected = monai_metric(confidence.unsqueeze(0), correct.unsqueeze(0).float())[0].double()
    ours = expected_calibration_error(prob, label, n_bins=15)
    assert torch.allclose(ours, expected, atol=1e-6, rtol=0)


def test_top_label_ece_below_monai():
    # With an even bin count each top-label bin merges the mirrored positive-class bins k and n - 1 - k,
    # so by the triangle inequality the top-label ECE cannot exceed MONAI's ECE on p against y.
    prob, label = _random_case(n_bins=10, seed=1)
    monai_metric = CalibrationErrorMetric(num_bins=10, metric_reduction="none")
    positive_class = monai_metric(prob.unsqueeze(0), label.unsqueeze(0).float())[0].double()
    top_label = expected_calibration_error(prob, label, n_bins=10)
    assert bool((top_label <= positive_class + 1e-6).all())


def _numpy_reference(prob, label, mask, n_bins):
    """Loop-based ACE, Brier and NLL per channel, written independently of the module."""
    ace, brier, nll = [], [], []
    for p_row, y_row, m_row in zip(prob.numpy(), label.numpy(), mask.numpy()):
        p, y = p_row[m_row], y_row[m_row]
        if p.size == 0:
            ace.append(math.nan)
            brier.append(math.nan)
            nll.append(math.nan)
            continue
        confidence = np.maximum(p, 1 - p)
        correct = (p >= 0.5) == y
        ordered = np.sort(confidence)
        groups = {}
        for c, ok in zip(confidence, correct):
            below = np.searchsorted(ordered, c, side="left")  # voxels with strictly lower confidence
            groups.setdefault(below * n_bins // p.size, []).append((c, ok))
        gaps = [abs(np.mean([c for c, _ in g]) - np.mean([ok for _, ok in g])) for g in groups.values()]
        ace.append(float(np.mean(gaps)))
        brier.append(float(np.mean((p - y) ** 2)))
        clipped = np.clip(p, NLL_EPS, 1 - NLL_EPS)
        nll.append(float(np.mean(-(y * np.log(clipped) + (1 - y) * np.log(1 - clipped)))))
    return [torch.tensor(values, dtype=torch.float64) for values in (ace, brier, nll)]


@pytest.mark.parametrize("n_bins", [15, 4])
def test_ace_brier_nll_match_numpy_reference(n_bins):
    generator = torch.Generator().manual_seed(2)
    # Rounding to two decimals creates many ties, which the tie rule must handle like the reference. float64
    # keeps 1 - p exact, so both implementations see the same confidences.
    prob = torch.round(torch.rand(3, 1500, generator=generator, dtype=torch.float64) * 100) / 100
    prob[0, :5] = torch.tensor([0.0, 1.0, 1.0, 0.0, 0.5])
    label = torch.rand(3, 1500, generator=generator) < prob
    mask = torch.rand(3, 1500, generator=generator) < 0.6
    ace, brier, nll = _numpy_reference(prob, label, mask, n_bins)
    assert torch.allclose(adaptive_calibration_error(prob, label, mask, n_bins=n_bins), ace, atol=1e-12)
    assert torch.allclose(brier_score(prob, label, mask), brier, atol=1e-12)
    assert torch.allclose(negative_log_likelihood(prob, label, mask), nll, atol=1e-9)


def test_ace_keeps_ties_together():
    # Confidences 0.6, 0.6, 0.6, 0.9 with two groups: the voxel at 0.9 has 3 lower voxels, group
    # floor(3 * 2 / 4) = 1. The tied ones have 0 lower, group 0. Labels 1, 0, 1, 1 make group 0 accuracy
    # 2/3 (gap 0.0667) and group 1 accuracy 1 (gap 0.1). ACE = (0.0667 + 0.1) / 2 = 0.08333.
    prob = torch.tensor([[0.6, 0.6, 0.6, 0.9]], dtype=torch.float64)
    label = torch.tensor([[True, False, True, True]])
    assert adaptive_calibration_error(prob, label, n_bins=2).item() == pytest.approx(1 / 12, abs=1e-12)


def test_ace_ignores_voxel_order():
    generator = torch.Generator().manual_seed(3)
    prob = torch.round(torch.rand(2, 500, generator=generator) * 20) / 20
    label = torch.rand(2, 500, generator=generator) < prob
    order = torch.randperm(500, generator=generator)
    shuffled = adaptive_calibration_error(prob[:, order], label[:, order])
    assert torch.equal(adaptive_calibration_error(prob, label), shuffled)


def test_ace_float32_float64_agree():
    # Multiples of 1/64 and their complements are exact in both dtypes, so both sort-key paths see the same
    # confidences and must group the voxels alike.
    generator = torch.Generator().manual_seed(8)
    prob = torch.randint(0, 65, (3, 800), generator=generator).double() / 64
    label = torch.rand(3, 800, generator=generator) < prob
    single = adaptive_calibration_error(prob.float(), label)
    double = adaptive_calibration_error(prob, label)
    assert torch.allclose(single, double, atol=1e-12)


def test_empty_voxel_set_gives_nan():
    prob, label = _random_case(n_channels=2, n_voxels=100)
    mask = torch.ones_like(label)
    mask[1] = False
    result = compute_calibration(prob, label, mask)
    for name in ("ece", "ace", "mce", "brier", "nll"):
        values = getattr(result, name)
        assert math.isfinite(values[0].item()), name
        assert math.isnan(values[1].item()), name
    assert result.n_voxels.tolist() == [100, 0]


def test_compute_calibration_matches_functions():
    prob, label = _random_case(seed=4)
    mask = torch.rand(prob.shape, generator=torch.Generator().manual_seed(5)) < 0.5
    result = compute_calibration(prob, label, mask)
    assert torch.equal(result.ece, expected_calibration_error(prob, label, mask))
    assert torch.equal(result.mce, maximum_calibration_error(prob, label, mask))
    assert torch.equal(result.ace, adaptive_calibration_error(prob, label, mask))
    assert torch.allclose(result.brier, brier_score(prob, label, mask), atol=1e-15)
    assert torch.allclose(result.nll, negative_log_likelihood(prob, label, mask), atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bin_statistics_match_numpy_bincount(dtype):
    # Independent reference: top-label confidence, bin index and sums with numpy in float64.
    generator = torch.Generator().manual_seed(6)
    prob = torch.rand((3, 5000), generator=generator, dtype=torch.float64).to(dtype)
    prob[0, :50] = 1.0
    prob[1, :50] = 0.0
    label = torch.rand(prob.shape, generator=generator) < 0.5
    mask = torch.rand(prob.shape, generator=generator) < 0.7
    bins = bin_statistics(prob, label, mask, n_bins=10)
    p = prob.numpy()
    confidence = np.maximum(p, 1 - p).astype(np.float64)
    correct = (p >= 0.5) == label.numpy()
    index = np.minimum(np.floor(confidence * 10).astype(int), 9)
    for k in range(3):
        keep = mask[k].numpy()
        count = np.bincount(index[k][keep], minlength=10)
        conf_sum = np.bincount(index[k][keep], weights=confidence[k][keep], minlength=10)
        correct_sum = np.bincount(index[k][keep], weights=correct[k][keep], minlength=10)
        np.testing.assert_array_equal(bins["count"][k].numpy(), count)
        np.testing.assert_allclose(bins["conf_sum"][k].numpy(), conf_sum, rtol=1e-12)
        np.testing.assert_array_equal(bins["correct_sum"][k].numpy(), correct_sum)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_fallback_equals_compiled_loop(dtype):
    # Environments without numba get the numpy path; both must give the same statistics.
    generator = np.random.default_rng(3)
    prob = generator.random((2, 4000)).astype(dtype)
    prob[0, :20] = 1.0
    label = generator.random((2, 4000)) < 0.4
    mask = generator.random((2, 4000)) < 0.6
    for chosen in (None, mask):
        compiled = calibration_kernels.bin_sums(prob, label, chosen, 12)
        fallback = calibration_kernels._numpy_bin_sums(prob, label.view(np.uint8), chosen, 12)
        np.testing.assert_array_equal(compiled[0], fallback[0])
        np.testing.assert_allclose(compiled[1], fallback[1], rtol=1e-12)
        np.testing.assert_array_equal(compiled[2], fallback[2])


def test_float32_confidence_sums_do_not_depend_on_order():
    # float32 confidences are summed as integers, so any permutation gives bit-identical sums.
    prob, label = _random_case(n_voxels=20000, seed=8)
    order = torch.randperm(prob.shape[1], generator=torch.Generator().manual_seed(9))
    direct = bin_statistics(prob, label)
    shuffled = bin_statistics(prob[:, order], label[:, order])
    assert torch.equal(direct["conf_sum"], shuffled["conf_sum"])
    assert torch.equal(direct["count"], shuffled["count"])


def test_binning_keeps_torch_thread_count():
    # numba's OpenMP layer shares torch's libgomp and, on its first parallel call in a process, sets the OpenMP
    # default to one thread per core. A fresh interpreter is needed, because earlier tests already made that call.
    script = (
        "import torch\n"
        "torch.set_num_threads(1)\n"
        "from scripts.calibration import compute_calibration\n"
        "prob = torch.rand(3, 3 * (1 << 20))\n"
        "compute_calibration(prob, prob > 0.5)\n"
        "print(torch.get_num_threads())\n"
    )
    environment = dict(
        os.environ,
        PYTHONPATH=str(Path(__file__).resolve().parents[1] / "calsam_bundle"),
        OMP_NUM_THREADS="1",
        NUMBA_NUM_THREADS="2",
    )
    result = subprocess.run(
        [sys.executable, "-c", script], env=environment, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == "1"


def test_nan_probability_is_named():
    prob = torch.tensor([[0.2, 0.7], [0.4, float("nan")]])
    with pytest.raises(ValueError, match=r"value nan at flat index 3"):
        expected_calibration_error(prob, torch.zeros(2, 2, dtype=torch.bool))


def test_numpy_inputs_accepted():
    prob = np.array([[0.9, 0.3]])
    label = np.array([[1, 1]])
    assert expected_calibration_error(prob, label).item() == pytest.approx(0.4, abs=1e-12)


@pytest.mark.parametrize(
    ("prob", "label", "message"),
    [
        (torch.tensor([[1.2]]), torch.tensor([[True]]), "in \\[0, 1\\]"),
        (torch.tensor([[math.nan]]), torch.tensor([[True]]), "in \\[0, 1\\]"),
        (torch.tensor([[0.5, 0.5]]), torch.tensor([[True]]), "must match"),
        (torch.tensor([[0.5]]), torch.tensor([[2]]), "only 0 and 1"),
        (torch.tensor([0.5]), torch.tensor([True]), "shape \\(K, N\\)"),
    ],
)
def test_invalid_inputs_raise(prob, label, message):
    with pytest.raises(ValueError, match=message):
        expected_calibration_error(prob, label)


def test_integer_probabilities_raise():
    with pytest.raises(TypeError, match="floating-point"):
        expected_calibration_error(torch.tensor([[1]]), torch.tensor([[True]]))


def test_zero_bins_raise():
    with pytest.raises(ValueError, match="n_bins"):
        expected_calibration_error(torch.tensor([[0.5]]), torch.tensor([[True]]), n_bins=0)


@pytest.mark.parametrize(
    "metric", [compute_calibration, expected_calibration_error, brier_score, adaptive_calibration_error]
)
def test_metrics_check_only_the_voxel_set(metric):
    # NaN outside the set is ignored, and the first bad value inside it is named at float32 precision.
    prob = np.full((2, 100), 0.3, dtype=np.float32)
    prob[0, 5] = np.nan
    prob[1, 7] = -1e-7
    mask = np.ones((2, 100), dtype=bool)
    mask[0, 5] = False
    with pytest.raises(ValueError, match=r"got the value -1e-07 at flat index 107;"):
        metric(prob, prob > 0.5, mask)
    mask[1, 7] = False
    result = metric(prob, prob > 0.5, mask)
    assert torch.isfinite(result.ece if metric is compute_calibration else result).all()


def test_no_channels_give_empty_results():
    result = compute_calibration(np.zeros((0, 5), np.float32), np.zeros((0, 5), bool))
    assert result.ece.shape == (0,)
    assert result.brier.shape == (0,)
    assert result.ace.shape == (0,)


def test_empty_set_nan_every_metric():
    prob = np.full((2, 50), 0.3, dtype=np.float32)
    result = compute_calibration(prob, prob > 0.5, np.zeros((2, 50), dtype=bool))
    for values in (result.ece, result.ace, result.mce, result.brier, result.nll):
        assert torch.isnan(values).all()
