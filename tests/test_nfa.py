"""U-Flow's a contrario (NFA) segmentation on synthetic latents: no detection on N(0, 1) latents,
detection of a planted region, the lower-tail caveat, the number of tests, the component tree."""

from __future__ import annotations

import math
import time
from collections import deque

import numpy as np
import pytest
import torch
from scipy.ndimage import label
from scipy.stats import chi2

from harness import nfa
from harness.nfa import (
    ComponentTree,
    component_tree,
    log10_chi2_tail_bound,
    log10_number_of_tests,
    log10_probability_map,
    meaningful_leaves,
    nfa_log_map,
    nfa_log_maps,
)

FINE, COARSE = 28, 14  # U-Flow's latent sizes at 448 px


def latents(rng: np.random.Generator, channels: int, size: int, variance: float = 1.0) -> np.ndarray:
    return rng.normal(0.0, math.sqrt(variance), (channels, size, size))


def planted_block(rng: np.random.Generator, channels: int, variance: float, size: int = FINE):
    """N(0, 1) latents with a 6x6 block of N(0, variance) latents; returns (sum_c z^2, block mask)."""
    z = latents(rng, channels, size)
    mask = np.zeros((size, size), dtype=bool)
    mask[10:16, 12:18] = True
    z[:, mask] *= math.sqrt(variance)
    return (z**2).sum(axis=0), mask


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return (a & b).sum() / max((a | b).sum(), 1)


# --- detection on synthetic latents -----------------------------------------------------------------


@pytest.mark.parametrize("channels", [16, 32, 64])
def test_standard_normal_latents_give_no_detection(channels):
    rng = np.random.default_rng(channels)
    for _ in range(4):
        fine, coarse = latents(rng, channels, FINE), latents(rng, channels // 2, COARSE)
        log_nfa = nfa_log_map([(fine**2).sum(0), (coarse**2).sum(0)], [channels, channels // 2], (56, 56))
        assert log_nfa.shape == (56, 56)
        assert (log_nfa >= 0).all()
        assert (nfa_log_map([(fine**2).sum(0)], [channels], (FINE, FINE), official_lower_tail=True) >= 0).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_planted_region_of_inflated_latents_is_detected(seed):
    rng = np.random.default_rng(seed)
    sum_sq, mask = planted_block(rng, channels=816, variance=2.0)  # U-Flow's fine-scale channel count
    coarse = (latents(rng, 192, COARSE) ** 2).sum(0)
    log_nfa = nfa_log_map([sum_sq, coarse], [816, 192], (FINE, FINE))
    assert iou(log_nfa < 0, mask) > 0.8
    assert log_nfa[mask].min() < -100  # far beyond the threshold, not a borderline call


def test_batch_helper_from_stored_float16_log_likelihoods():
    """The stored maps are -0.5 mean_c z^2 in float16; sum_c z^2 = -2 C logp is recovered from them."""
    rng = np.random.default_rng(5)
    channels = [816, 192]
    fine, coarse, masks = [], [], []
    for planted in (True, False, True):
        sum_sq, mask = planted_block(rng, 816, 2.0) if planted else ((latents(rng, 816, FINE) ** 2).sum(0), None)
        fine.append(sum_sq)
        coarse.append((latents(rng, 192, COARSE) ** 2).sum(0))
        masks.append(mask if planted else np.zeros((FINE, FINE), dtype=bool))
    logp = [torch.from_numpy(-0.5 * np.stack(s) / c).half() for s, c in zip((fine, coarse), channels)]
    log_nfa = nfa_log_maps(logp, channels, (FINE, FINE))
    assert log_nfa.shape == (3, FINE, FINE)
    assert iou(log_nfa[0] < 0, masks[0]) > 0.8 and iou(log_nfa[2] < 0, masks[2]) > 0.8
    assert not (log_nfa[1] < 0).any()
    single = nfa_log_map([fine[0], coarse[0]], channels, (FINE, FINE))
    np.testing.assert_array_equal(log_nfa[0] < 0, single < 0)


def test_under_dispersed_latents_caveat():
    """z ~ N(0, 0.9): the Chernoff expression used below its validity range (x <= C) makes the whole
    image 'significant' in the reference code; by default such evidence is ignored."""
    rng = np.random.default_rng(0)
    fine, coarse = latents(rng, 816, FINE, 0.9), latents(rng, 192, COARSE, 0.9)
    maps, channels = [(fine**2).sum(0), (coarse**2).sum(0)], [816, 192]
    assert (nfa_log_map(maps, channels, (FINE, FINE)) >= 0).all()
    assert (nfa_log_map(maps, channels, (FINE, FINE), official_lower_tail=True) < 0).all()


def test_a_28x28_map_takes_well_under_a_second():
    rng = np.random.default_rng(0)
    maps = [(latents(rng, 816, FINE) ** 2).sum(0), (latents(rng, 192, COARSE) ** 2).sum(0)]
    start = time.perf_counter()
    nfa_log_map(maps, [816, 192], (256, 256))
    assert time.perf_counter() - start < 1.0


# --- the pieces ---------------------------------------------------------------------------------------


def test_chernoff_bound_is_an_upper_bound_of_the_chi_square_tail():
    for channels in (16, 192, 816):
        x = channels * np.linspace(1.01, 4.0, 50)
        assert (log10_chi2_tail_bound(x, channels) >= chi2.logsf(x, channels) / math.log(10)).all()
        below = channels * np.array([0.5, 0.9, 1.0])
        assert (log10_chi2_tail_bound(below, channels) == 0).all()
        assert (log10_chi2_tail_bound(below[:2], channels, official_lower_tail=True) < 0).all()


@pytest.mark.parametrize("sizes", [[1], [4], [9, 4], [25, 9, 4], [64, 16]])
def test_number_of_tests_matches_a_direct_sum(sizes):
    alpha, beta = nfa.POLYOMINO_ALPHA, nfa.POLYOMINO_BETA
    direct = sum(n * sum(alpha * beta**r / r for r in range(1, n + 1)) for n in sizes)
    assert log10_number_of_tests(sizes) == pytest.approx(math.log10(direct), rel=1e-12)


def test_number_of_tests_at_uflow_sizes():
    # specs/baselines.md 6.4: |Omega_1| = 784 gives log10 N ~ 477; the 14x14 scale adds almost nothing.
    assert log10_number_of_tests([784]) == pytest.approx(476.92, abs=0.01)
    assert log10_number_of_tests([784, 196]) == pytest.approx(log10_number_of_tests([784]), abs=1e-9)


def flood_fill_size(image: np.ndarray, seed: tuple[int, int], level: float) -> int:
    """Pixels 4-connected to seed within {image >= level}."""
    h, w = image.shape
    seen = {seed}
    queue = deque([seed])
    while queue:
        i, j = queue.popleft()
        for a, b in ((i + 1, j), (i - 1, j), (i, j + 1), (i, j - 1)):
            if 0 <= a < h and 0 <= b < w and (a, b) not in seen and image[a, b] >= level:
                seen.add((a, b))
                queue.append((a, b))
    return len(seen)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_component_tree_sizes_match_a_flood_fill(seed):
    image = np.random.default_rng(seed).integers(0, 4, (7, 6)).astype(float)  # many ties
    tree = component_tree(image)
    assert tree.parent[0] == -1 and (tree.parent[1:] < np.arange(1, len(tree.parent))).all()
    for node in range(len(tree.parent)):
        pixels = np.argwhere(tree.pixel_node == node)
        assert len(pixels) > 0
        assert (image[tuple(pixels.T)] == tree.level[node]).all()  # equal-level pixels share a node
        assert tree.size[node] == flood_fill_size(image, tuple(pixels[0]), tree.level[node])
        if tree.parent[node] >= 0:
            assert tree.level[tree.parent[node]] < tree.level[node]
    # One node per connected component of a level set {image >= v} that holds a pixel of level v
    # (the other components are the same sets as components of higher level sets).
    expected = 0
    for v in np.unique(image):
        labels, _ = label(image >= v)
        expected += len(np.unique(labels[image == v]))
    assert len(tree.parent) == expected


def test_prune_keeps_the_most_significant_node_of_a_chain_and_merge_climbs():
    # root 0 -> 1 -> 2 -> {3, 4}: chain (0, 1, 2) keeps 1; then 1 beats both leaves and absorbs them.
    tree = ComponentTree(parent=np.array([-1, 0, 1, 2, 2]), level=np.zeros(5), size=np.ones(5, int),
                         pixel_node=np.arange(5).reshape(1, 5))
    leaves = meaningful_leaves(tree, np.array([0.0, -9.0, -5.0, -3.0, -4.0]))
    assert leaves.tolist() == [False, True, False, False, False]
    # A parent less significant than one of its leaves keeps them.
    leaves = meaningful_leaves(tree, np.array([0.0, -1.0, -2.0, -3.0, -1.5]))
    assert leaves.tolist() == [False, False, False, True, True]


def test_pixels_outside_meaningful_leaves_get_zero():
    sum_sq = np.full((5, 5), 16.0)  # exactly C: no evidence anywhere
    sum_sq[2, 2] = 200.0
    out = log10_probability_map(sum_sq, channels=16)
    assert out[2, 2] < 0 and (np.delete(out.ravel(), 12) == 0).all()


def _leaves(parent: list[int], log10_p: list[float]) -> list[int]:
    n = len(parent)
    tree = ComponentTree(parent=np.array(parent), level=np.zeros(n), size=np.ones(n, int),
                         pixel_node=np.arange(n).reshape(1, n))
    return np.flatnonzero(meaningful_leaves(tree, np.array(log10_p))).tolist()


def test_prune_leaves_inner_chains_alone():
    # root 0 -> 1 -> 2 -> {3, 4}: the chain (1, 2) ends in a node with two children, so it is not
    # pruned; 2 is less significant than leaf 3, so nothing merges and the leaves stay. (Pruning
    # every chain would keep 1, which then absorbs both leaves: one larger region.)
    assert _leaves([-1, 0, 1, 2, 2], [0.0, -20.0, -5.0, -8.0, -8.0]) == [3, 4]


def test_prune_keeps_the_bottom_most_node_on_ties():
    # root 0 -> {1, 4}; 1 -> 2 -> 3 (a leaf chain, equally significant): 3 is kept, not 1.
    assert _leaves([-1, 0, 1, 2, 0], [0.0, -4.0, -4.0, -4.0, -1.0]) == [3, 4]
    # a strictly more significant upper node still wins
    assert _leaves([-1, 0, 1, 2, 0], [0.0, -4.0, -5.0, -4.0, -1.0]) == [2, 4]


def test_float16_ties_change_the_tree():
    """Why the NFA is computed from float32 maps: rounding to float16 merges distinct levels."""
    rng = np.random.default_rng(3)
    sum_sq = 816 + rng.normal(0, 3, (28, 28))
    exact = component_tree(sum_sq.astype(np.float32))
    rounded = component_tree(sum_sq.astype(np.float16).astype(np.float32))
    assert len(rounded.parent) < len(exact.parent)
