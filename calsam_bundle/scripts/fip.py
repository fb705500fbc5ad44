"""Feature Fisher information penalty (FIP) of the trainable mask decoder, with cheaper estimators.

The decoder maps a slab of frozen slice embeddings ``F`` of shape ``(S, C, h, w)`` to logits ``z`` of shape
``(P, 1, H, W)``, one map per prompted (slice, region) pair, with independent Bernoulli voxels ``p = sigmoid(z)``.
The Fisher information of that predictive distribution with respect to ``F`` has trace

    tr I(F) = sum_v roi_v * p_v * (1 - p_v) * ||dz_v / dF||^2

and the penalty is this trace divided by ``sum_v roi_v``, the number of output voxels in the 3D region of interest
of the slab. Every estimator here targets that one value:

- ``exact``: one sampled-label gradient, trained through by double backpropagation.
- ``finite_difference``: ``2 KL(p(F) || p(F + eps u)) / eps^2`` along a random direction ``u``, one extra forward.
- ``subbatch``: the exact estimator on a random subset of pairs, rescaled to the whole slab.
- ``every_k``: the exact estimator every ``k``-th iteration, multiplied by ``k``, zero otherwise.

References:
    Kirillov et al., "Segment Anything", ICCV 2023 (the mask decoder this penalty regularises).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "ESTIMATORS",
    "FISHER_TYPES",
    "FisherPenalty",
    "fisher_trace_every_k",
    "fisher_trace_exact",
    "fisher_trace_finite_difference",
    "fisher_trace_subbatch",
]

ESTIMATORS = ("exact", "finite_difference", "subbatch", "every_k")
FISHER_TYPES = ("sampled", "empirical")

Decode = Callable[..., torch.Tensor]


def _zero_penalty(logits: torch.Tensor) -> torch.Tensor:
    """Return a 0-d zero that is part of the graph of ``logits``, so ``backward`` works on it."""
    # Summing an empty slice gives an exact 0 even when some logits are inf or NaN, unlike ``0 * logits.sum()``.
    return logits.flatten()[:0].sum()


def _check_pair_tensor(name: str, tensor: torch.Tensor, reference: torch.Tensor) -> None:
    """Raise unless ``tensor`` is a 4-D tensor with the shape ``(P, 1, H, W)`` of ``reference``."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (P, 1, H, W), got {type(tensor).__name__}.")
    if tensor.ndim != 4 or tensor.shape != reference.shape:
        raise ValueError(
            f"{name} must have the shape (P, 1, H, W) of the logits, {tuple(reference.shape)}, "
            f"got {tuple(tensor.shape)}."
        )


def _check_logits_and_features(logits: torch.Tensor, features: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor) or logits.ndim != 4 or logits.shape[1] != 1:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a tensor of shape (P, 1, H, W), got {shape}.")
    if not isinstance(features, torch.Tensor) or features.ndim != 4:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f"features must be a tensor of shape (S, C, h, w), got {shape}.")


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def _check_fraction(fraction: object) -> None:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"fraction must be a number in (0, 1], got {fraction!r}.")


def _check_eps(eps: object) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a positive finite number, got {eps!r}.")


def _roi_normaliser(roi: torch.Tensor) -> torch.Tensor:
    # An empty ROI has a zero numerator too, so the clamp turns 0 / 0 into 0 without changing any other value.
    return roi.sum().clamp_min(torch.finfo(roi.dtype).tiny)


def _decode_checked(decode: Decode, features: torch.Tensor, pair_index: torch.Tensor | None, reference: torch.Tensor):
    logits = decode(features, pair_index)
    expected = reference.shape if pair_index is None else (len(pair_index), *reference.shape[1:])
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != tuple(expected):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(
            f"decode(features, pair_index) must return logits of shape {tuple(expected)} "
            f"(one map per requested pair), got {shape}."
        )
    return logits


def fisher_trace_exact(
    logits: torch.Tensor,
    features: torch.Tensor,
    roi: torch.Tensor,
    *,
    fisher: str = "sampled",
    target: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    create_graph: bool = True,
) -> torch.Tensor:
    """Estimate the Fisher trace per ROI voxel from one gradient of the negative log-likelihood.

    With ``N = sum_v roi_v * BCE(z_v, y_v)`` and labels ``y`` drawn from ``Bernoulli(sigmoid(z))`` and detached
    (``fisher="sampled"``), ``dN/dF = sum_v roi_v (p_v - y_v) dz_v/dF``. The ``p_v - y_v`` are independent with mean 0
    and variance ``p_v (1 - p_v)``, so the cross terms of ``||dN/dF||^2`` vanish in expectation and

        E ||dN/dF||^2 = sum_v roi_v^2 p_v (1 - p_v) ||dz_v/dF||^2,

    which is the Fisher trace because ``roi_v^2 = roi_v`` for weights in {0, 1}. With ``fisher="empirical"`` the
    labels are ``target``. That is the empirical Fisher, a different quantity that keeps the cross terms and vanishes
    where the prediction equals the target.

    Args:
        logits: decoder logits ``(P, 1, H, W)``, computed from ``features`` with the graph kept.
        features: frozen slab embeddings ``(S, C, h, w)``, a tensor with ``requires_grad=True``.
        roi: weights ``(P, 1, H, W)`` in {0, 1} of the 3D region of interest.
        fisher: ``"sampled"`` (true Fisher, default) or ``"empirical"``.
        target: ground truth ``(P, 1, H, W)`` in {0, 1}; required for ``fisher="empirical"``.
        generator: random generator on the device of ``logits`` for the label draw; the global one when None.
        create_graph: keep the graph of the gradient so the result can be trained through. Set False to only
            measure the value.

    Returns:
        A 0-d tensor ``||dN/dF||^2 / sum(roi)``, zero when ``P == 0``, when the ROI is empty, or when the logits
        do not depend on ``features``.

    Raises:
        ValueError: on shapes that disagree, an unknown ``fisher``, a missing ``target``, or ``features`` without
            ``requires_grad``.

    Note:
        The gradient of this estimate with respect to the decoder parameters treats the drawn labels as constants.
        Its expectation is ``sum_v roi_v p_v (1 - p_v) d||dz_v/dF||^2 / dtheta``: it penalises the feature
        sensitivity of the logits but misses the term from ``d[p_v (1 - p_v)] / dtheta``, which would need a
        score-function correction. The finite-difference estimator has no such gap.
    """
    _check_logits_and_features(logits, features)
    _check_pair_tensor("roi", roi, logits)
    if fisher not in FISHER_TYPES:
        raise ValueError(f"fisher must be one of {FISHER_TYPES}, got {fisher!r}.")
    if fisher == "empirical":
        if target is None:
            raise ValueError("fisher='empirical' uses the ground truth as labels, so target must be given, got None.")
        _check_pair_tensor("target", target, logits)
    if logits.shape[0] == 0:
        return _zero_penalty(logits)
    if not features.requires_grad:
        raise ValueError(
            "features must have requires_grad=True for the exact Fisher estimator, which differentiates the logits "
            "with respect to them. Create them as a leaf with features.detach().requires_grad_() before the decoder "
            "forward (the trainer does so when engine.features_require_grad is True)."
        )
    if not logits.requires_grad:
        # Logits computed without autograd cannot depend on the features through a graph.
        return _zero_penalty(logits)

    if fisher == "sampled":
        labels = torch.bernoulli(torch.sigmoid(logits.detach()), generator=generator)
    else:
        labels = target.to(logits.dtype)
    nll = F.binary_cross_entropy_with_logits(logits, labels, weight=roi, reduction="sum")
    (grad,) = torch.autograd.grad(nll, features, create_graph=create_graph, allow_unused=True)
    if grad is None:
        return _zero_penalty(logits)
    return grad.pow(2).sum() / _roi_normaliser(roi)


def _bernoulli_kl_with_logits(base: torch.Tensor, perturbed: torch.Tensor) -> torch.Tensor:
    """Compute ``KL(Bernoulli(sigmoid(base)) || Bernoulli(sigmoid(perturbed)))`` per voxel, in float64.

    The KL is ``softplus(b) - softplus(a) - sigmoid(a) (b - a)``, second order in ``b - a``, so in float32 the
    cancellation leaves a relative error of about ``1e-7 / (b - a)^2``. Float64 keeps it negligible at ``eps = 1e-3``.
    """
    a = base.double()
    b = perturbed.double()
    return F.softplus(b) - F.softplus(a) - torch.sigmoid(a) * (b - a)


def fisher_trace_finite_difference(
    decode: Decode,
    features: torch.Tensor,
    logits: torch.Tensor,
    roi: torch.Tensor,
    *,
    eps: float = 1e-2,
    generator: torch.Generator | None = None,
    pair_index: torch.Tensor | None = None,
    direction: torch.Tensor | None = None,
) -> torch.Tensor:
    """Estimate the Fisher trace per ROI voxel from the KL divergence after a random feature perturbation.

    For ``u ~ N(0, I)`` over the whole slab, ``KL(p(F) || p(F + eps u)) = eps^2 / 2 * u^T I(F) u + O(eps^4)`` in
    expectation, and ``E[u^T I u] = tr I``. The estimate is ``2 * sum_v roi_v KL_v / eps^2 / sum(roi)``, with one extra
    decoder forward and no second-order backward.

    The perturbed forward uses ``features.detach()``, so ``features`` needs no gradient. The base ``logits`` are not
    detached: the KL's gradient with respect to the decoder parameters then equals, to leading order,
    ``d/dtheta (eps^2 / 2 * u^T I u)``. With detached base logits it would contain a term linear in ``u`` of order
    ``eps``, zero in expectation but a factor ``1 / eps`` larger than the signal after dividing by ``eps^2``.

    Args:
        decode: ``decode(features (S, C, h, w), pair_index) -> (P', 1, H, W)``, the decoder rerun with the same prompts.
        features: frozen slab embeddings ``(S, C, h, w)``.
        logits: decoder logits ``(P, 1, H, W)`` of the unperturbed features, graph kept.
        roi: weights ``(P, 1, H, W)`` in {0, 1} of the 3D region of interest.
        eps: standard deviation of the perturbation per feature element, in feature units. The quadratic expansion
            needs ``eps * ||dz_v/dF||`` to stay well below 1 logit.
        generator: random generator on the device of ``features`` for ``u``; the global one when None.
        pair_index: indices ``(P',)`` of the pairs to evaluate; all pairs when None. A subset estimate is multiplied by
            ``P / P'`` and divided by the ROI size of the whole slab, which is unbiased for a uniformly random subset.
        direction: the perturbation direction ``u`` of shape ``(S, C, h, w)``; drawn from ``N(0, I)`` when None.

    Returns:
        A 0-d tensor in the dtype of ``logits``; zero when ``P == 0`` or the ROI is empty.

    Raises:
        ValueError: on shapes that disagree or ``eps <= 0``.
    """
    _check_logits_and_features(logits, features)
    _check_pair_tensor("roi", roi, logits)
    _check_eps(eps)
    if direction is not None and direction.shape != features.shape:
        raise ValueError(
            f"direction must have the shape of features, {tuple(features.shape)}, got {tuple(direction.shape)}."
        )
    num_pairs = logits.shape[0]
    if num_pairs == 0:
        return _zero_penalty(logits)

    if direction is None:
        direction = torch.randn(features.shape, generator=generator, device=features.device, dtype=features.dtype)
    perturbed = _decode_checked(decode, features.detach() + eps * direction, pair_index, logits)

    base, weights, scale = logits, roi, 1.0
    if pair_index is not None:
        base, weights, scale = logits[pair_index], roi[pair_index], num_pairs / max(len(pair_index), 1)
    kl_sum = (weights.double() * _bernoulli_kl_with_logits(base, perturbed)).sum()
    value = scale * 2.0 * kl_sum / (eps**2) / _roi_normaliser(roi.double())
    return value.to(logits.dtype)


def _draw_pair_subset(
    num_pairs: int, fraction: float, max_pairs: int | None, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    size = max(1, math.ceil(fraction * num_pairs))
    if max_pairs is not None:
        size = min(size, max_pairs)
    return torch.randperm(num_pairs, generator=generator, device=device)[:size].sort().values


def fisher_trace_subbatch(
    decode: Decode,
    features: torch.Tensor,
    logits: torch.Tensor,
    roi: torch.Tensor,
    *,
    fraction: float = 0.25,
    max_pairs: int | None = None,
    fisher: str = "sampled",
    target: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Estimate the Fisher trace per ROI voxel with the exact estimator on a random subset of pairs.

    The decoder is rerun on the subset from a fresh leaf copy of ``features``, so the double backward runs over the
    subset's graph only and the main forward needs no feature gradient. The subset value is multiplied by
    ``P / P'`` and divided by the ROI size of the whole slab. Every pair enters with probability ``P' / P``, so the
    expectation over subsets and labels equals the full exact estimate.

    Args:
        decode: ``decode(features (S, C, h, w), pair_index) -> (P', 1, H, W)``.
        features: frozen slab embeddings ``(S, C, h, w)``.
        logits: decoder logits ``(P, 1, H, W)``; only their shape and device are used.
        roi: weights ``(P, 1, H, W)`` in {0, 1} of the 3D region of interest.
        fraction: share of pairs evaluated, rounded up to at least one pair.
        max_pairs: upper bound on the subset size; none when None.
        fisher: ``"sampled"`` or ``"empirical"``, as in :func:`fisher_trace_exact`.
        target: ground truth ``(P, 1, H, W)``; required for ``fisher="empirical"``.
        generator: random generator on the device of ``features`` for the subset and the labels.

    Returns:
        A 0-d tensor; zero when ``P == 0`` or the ROI is empty.
    """
    _check_logits_and_features(logits, features)
    _check_pair_tensor("roi", roi, logits)
    _check_fraction(fraction)
    if max_pairs is not None:
        _check_positive_int("max_pairs", max_pairs)
    num_pairs = logits.shape[0]
    if num_pairs == 0:
        return _zero_penalty(logits)

    pair_index = _draw_pair_subset(num_pairs, fraction, max_pairs, generator, features.device)
    leaf = features.detach().requires_grad_(True)
    subset_logits = _decode_checked(decode, leaf, pair_index, logits)
    subset_target = None if target is None else target[pair_index]
    subset_roi = roi[pair_index]
    value = fisher_trace_exact(
        subset_logits, leaf, subset_roi, fisher=fisher, target=subset_target, generator=generator
    )
    # fisher_trace_exact divided by the subset's ROI size, so rescale to the ROI size of the whole slab.
    scale = num_pairs / len(pair_index) * _roi_normaliser(subset_roi) / _roi_normaliser(roi)
    return value * scale


def fisher_trace_every_k(
    logits: torch.Tensor,
    features: torch.Tensor,
    roi: torch.Tensor,
    iteration: int,
    *,
    every: int,
    fisher: str = "sampled",
    target: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Return ``every`` times the exact estimate when ``iteration % every == 0``, and zero otherwise.

    The factor ``every`` keeps the penalty's gradient, averaged over any ``every`` consecutive iterations, equal to
    that of the exact estimator on every iteration, so ``lambda_F`` means the same for all estimators. The price
    is a penalty gradient ``every`` times larger on the iterations that compute it.

    Args:
        logits, features, roi, fisher, target, generator: as in :func:`fisher_trace_exact`.
        iteration: the engine's global iteration, 1-based in Ignite.
        every: period ``k`` in iterations, at least 1.

    Returns:
        A 0-d tensor.
    """
    _check_positive_int("every", every)
    if iteration % every != 0:
        return _zero_penalty(logits)
    value = fisher_trace_exact(logits, features, roi, fisher=fisher, target=target, generator=generator)
    return every * value


class FisherPenalty:
    """Configured FIP estimator, called on the trainer's output dict once per iteration.

    Args:
        estimator: ``"exact"``, ``"finite_difference"``, ``"subbatch"`` or ``"every_k"``.
        fisher: ``"sampled"`` (true Fisher) or ``"empirical"`` (labels from the target). The finite-difference
            estimator measures the true Fisher only.
        eps: perturbation scale of ``finite_difference`` in feature units.
        fraction: share of pairs used by ``subbatch``.
        max_pairs: upper bound on the ``subbatch`` subset size; none when None.
        every: period of ``every_k`` in iterations.
        seed: None draws from torch's global generator, which ``monai.utils.set_determinism`` seeds. An integer
            makes every draw a function of ``(seed, rank, iteration)`` only, so a resumed run replays the same draws.

    Raises:
        ValueError: on an unknown name or a value out of range, naming the allowed choices.
    """

    def __init__(
        self,
        estimator: str = "exact",
        fisher: str = "sampled",
        eps: float = 1e-2,
        fraction: float = 0.25,
        max_pairs: int | None = None,
        every: int = 4,
        seed: int | None = None,
    ) -> None:
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}.")
        if fisher not in FISHER_TYPES:
            raise ValueError(f"fisher must be one of {FISHER_TYPES}, got {fisher!r}.")
        if estimator == "finite_difference" and fisher == "empirical":
            raise ValueError(
                "estimator='finite_difference' measures the KL between predictive distributions, which is the true "
                "(sampled) Fisher; use fisher='sampled' or another estimator for fisher='empirical'."
            )
        _check_eps(eps)
        _check_fraction(fraction)
        if max_pairs is not None:
            _check_positive_int("max_pairs", max_pairs)
        _check_positive_int("every", every)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"seed must be None or a non-negative integer, got {seed!r}.")
        self.estimator = estimator
        self.fisher = fisher
        self.eps = float(eps)
        self.fraction = float(fraction)
        self.max_pairs = max_pairs
        self.every = every
        self.seed = seed

    @property
    def needs_feature_grad(self) -> bool:
        """Whether the trainer's main forward must take ``features`` as a leaf with ``requires_grad=True``."""
        # subbatch and finite_difference rerun the decoder themselves and need no graph from the main features.
        return self.estimator in ("exact", "every_k")

    def _generator(self, device: torch.device, iteration: int, rank: int) -> torch.Generator | None:
        if self.seed is None:
            return None
        # SeedSequence mixes the three integers, so neighbouring iterations or ranks get unrelated streams.
        state = np.random.SeedSequence([self.seed, rank, iteration]).generate_state(1, dtype=np.uint64)[0]
        # NOTE: only CPU generators are exercised by the tests; the CUDA path has not run on a GPU.
        return torch.Generator(device=device).manual_seed(int(state))

    def __call__(self, output: Mapping[str, object], iteration: int, rank: int = 0) -> torch.Tensor:
        """Compute the configured estimate from the trainer's output dict.

        Args:
            output: dict with ``"logits"`` ``(P, 1, H, W)``, ``"features"`` ``(S, C, h, w)``, ``"roi"``, and, as the
                estimator needs them, ``"target"`` ``(P, 1, H, W)`` and ``"decode"``.
            iteration: the engine's global iteration (1-based), used by ``every_k`` and by seeded draws.
            rank: distributed rank, mixed into seeded draws so that ranks draw different perturbations.

        Returns:
            A 0-d tensor.

        Raises:
            ValueError: when a needed key is missing.
        """
        needed = ["logits", "features", "roi"]
        if self.fisher == "empirical":
            needed.append("target")
        if self.estimator in ("finite_difference", "subbatch"):
            needed.append("decode")
        missing = [key for key in needed if key not in output]
        if missing:
            raise ValueError(
                f"The output dict lacks {missing}, which estimator={self.estimator!r} with fisher={self.fisher!r} "
                f"needs; it has keys {sorted(output)}. The trainer must store them before LOSS_COMPLETED."
            )
        logits = output["logits"]
        features = output["features"]
        roi = output["roi"]
        target = output.get("target")
        generator = self._generator(features.device, iteration, rank)

        if self.estimator == "exact":
            return fisher_trace_exact(logits, features, roi, fisher=self.fisher, target=target, generator=generator)
        if self.estimator == "every_k":
            return fisher_trace_every_k(
                logits,
                features,
                roi,
                iteration,
                every=self.every,
                fisher=self.fisher,
                target=target,
                generator=generator,
            )
        if self.estimator == "subbatch":
            return fisher_trace_subbatch(
                output["decode"],
                features,
                logits,
                roi,
                fraction=self.fraction,
                max_pairs=self.max_pairs,
                fisher=self.fisher,
                target=target,
                generator=generator,
            )
        return fisher_trace_finite_difference(
            output["decode"], features, logits, roi, eps=self.eps, generator=generator
        )

    def __repr__(self) -> str:
        return (
            f"FisherPenalty(estimator={self.estimator!r}, fisher={self.fisher!r}, eps={self.eps}, "
            f"fraction={self.fraction}, max_pairs={self.max_pairs}, every={self.every}, seed={self.seed})"
        )
