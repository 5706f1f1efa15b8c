"""A contrario detection on flow latents: U-Flow's tree-based NFA segmentation.

Tailanian, Pardo, Musé, JMIV 2024 (arXiv 2211.12353); specs/baselines.md section 6.4. Written from
the specification, not from the reference code.

Idea. Under the normal-data hypothesis the latents of every pixel are i.i.d. N(0, 1) in each of
the C channels, so the per-pixel score S = sum_c z^2 follows a chi-square law with C degrees of
freedom. A region R whose pixels all score at least x has probability at most P(chi2_C >= x)^|R|
under that hypothesis. Candidate regions are the connected components of the upper level sets
{S >= lambda} (the component tree, or max-tree). A region is meaningful when its number of false
alarms, NFA = N_tests * P(R), is below 1, where N_tests counts the candidate regions: every
polyomino (4-connected shape) of every size at every position, about alpha * beta^r / r shapes of
r pixels.

Steps, per image and latent scale:
  1. component tree of the upper level sets of S (4-connectivity), equal-level nodes collapsed;
  2. each node gets x = its level (the minimum of S over its region) and
     log10 P(R) = |R| * log10 of the Chernoff bound of the chi-square upper tail,
     log10 P(chi2_C >= x) <= -(C/2) (x/C - 1 - ln(x/C)) / ln 10;
  3. "prune" (in every chain of single-child nodes that ends in a leaf keep only the most
     significant node, the bottom-most on ties; inner chains and the root are left alone) and
     "merge" (a node whose children are all leaves replaces them if it is at least as
     significant as each of them) until nothing changes. The maps must be float32 or wider:
     float16 rounding creates ties that change the tree;
  4. every remaining leaf writes its log10 P on its pixels, other pixels get 0.
Then the per-scale maps are upsampled bilinearly to the output size, the minimum over scales is
taken and log10 N_tests is added: the result is a log10 NFA map, and a pixel is detected when
log10 NFA < 0 (NFA < 1).

Deliberate deviation (``official_lower_tail``). The Chernoff expression bounds the UPPER tail only
for x > C; for x <= C the true tail probability is at least about 1/2, yet the expression is
again negative (x/C - 1 - ln(x/C) >= 0 for every x). The reference applies it there too, so a
region of slightly under-dispersed latents (x a little below C, e.g. z ~ N(0, 0.9)) covering the
image becomes hugely "significant" and the whole image is flagged. By default we use log10 P = 0
(no evidence) for x <= C; ``official_lower_tail=True`` reproduces the reference behaviour.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from skimage.morphology import max_tree

# Polyomino counting constants: the number of r-cell polyominoes grows as alpha * beta^r / r.
POLYOMINO_ALPHA = 0.316915
POLYOMINO_BETA = 4.062570
LN10 = math.log(10.0)


# --- probabilities and the number of tests ------------------------------------------------------


def log10_chi2_tail_bound(x: np.ndarray | float, channels: int, official_lower_tail: bool = False) -> np.ndarray:
    """Per-pixel log10 P(chi2_C >= x) by the Chernoff bound -(C/2)(x/C - 1 - ln(x/C)) / ln 10.

    The bound holds for x > C. For x <= C it is set to 0 (no evidence), unless
    ``official_lower_tail`` (the reference code applies the same expression there as well).
    """
    ratio = np.maximum(np.asarray(x, dtype=np.float64), 1e-300) / channels
    bound = -(channels / 2.0) * (ratio - 1.0 - np.log(ratio)) / LN10
    if official_lower_tail:
        return bound
    return np.where(ratio > 1.0, bound, 0.0)


def log10_number_of_tests(region_counts: Sequence[int]) -> float:
    """log10 N_tests with N_tests = sum_s |Omega_s| * sum_{r=1..|Omega_s|} alpha * beta^r / r.

    |Omega_s| is the number of pixels of scale s. Computed in log space: for a 28x28 map the sum is
    about 10^477, far beyond float64.
    """
    log_terms = []
    for n in region_counts:
        r = np.arange(1, int(n) + 1, dtype=np.float64)
        log_shapes = math.log(POLYOMINO_ALPHA) + r * math.log(POLYOMINO_BETA) - np.log(r)
        log_terms.append(math.log(n) + float(np.logaddexp.reduce(log_shapes)))
    return float(np.logaddexp.reduce(np.array(log_terms))) / LN10


# --- the component tree --------------------------------------------------------------------------


@dataclass
class ComponentTree:
    """Component tree of the upper level sets of a 2D map, one node per distinct component.

    Nodes are numbered top-down (a node's parent has a smaller index); node 0 is the root (the
    whole map at its minimum level).
    """

    parent: np.ndarray  # [K] int, -1 for the root
    level: np.ndarray  # [K] float, the component's level lambda = min of the map over its region
    size: np.ndarray  # [K] int, number of pixels of the component
    pixel_node: np.ndarray  # [h, w] int, the smallest component that holds each pixel


def component_tree(score: np.ndarray) -> ComponentTree:
    """The max-tree of ``score`` (4-connectivity) with equal-level nodes collapsed.

    skimage's max_tree links every pixel to a parent pixel; a pixel is the canonical element of a
    node when its parent lies at a lower level (or it is the root); the other pixels belong to the
    node of their parent, which has the same level.
    """
    score = np.asarray(score, dtype=np.float64)
    parent_pixel, order = max_tree(score, connectivity=1)
    parents = parent_pixel.ravel().tolist()
    values = score.ravel().tolist()
    pixel_node = [0] * score.size
    node_parent: list[int] = []
    node_level: list[float] = []
    for p in order.tolist():  # parents come before their children
        q = parents[p]
        if q == p:  # the root
            pixel_node[p] = len(node_parent)
            node_parent.append(-1)
            node_level.append(values[p])
        elif values[q] != values[p]:  # canonical pixel of a new node
            pixel_node[p] = len(node_parent)
            node_parent.append(pixel_node[q])
            node_level.append(values[p])
        else:
            pixel_node[p] = pixel_node[q]
    size = np.bincount(pixel_node, minlength=len(node_parent))
    for k in range(len(node_parent) - 1, 0, -1):  # children have larger indices: accumulate bottom-up
        size[node_parent[k]] += size[k]
    return ComponentTree(
        parent=np.array(node_parent),
        level=np.array(node_level),
        size=size,
        pixel_node=np.array(pixel_node).reshape(score.shape),
    )


# --- selecting the meaningful regions ------------------------------------------------------------


def _prune(alive: list[bool], parent: list[int], children: list[list[int]], log10_p: list[float]) -> bool:
    """Keep only the most significant node of every chain of single-child nodes that ends in a
    leaf (the bottom-most on ties), as the reference does. Chains that end in a node with several
    children are left alone, and the root never belongs to a chain."""
    chain_of: dict[int, int] = {}
    chains: list[list[int]] = []
    for k in range(len(alive)):  # top-down
        if not alive[k]:
            continue
        p = parent[k]
        if p >= 0 and parent[p] >= 0 and len(children[p]) == 1:
            chain_of[k] = chain_of[p]
            chains[chain_of[k]].append(k)
        else:
            chain_of[k] = len(chains)
            chains.append([k])
    changed = False
    for chain in chains:
        if len(chain) == 1 or children[chain[-1]]:
            continue
        best = min(reversed(chain), key=lambda k: log10_p[k])  # min keeps the first: bottom-most
        top, bottom = chain[0], chain[-1]
        above, below = parent[top], children[bottom]
        for k in chain:
            if k != best:
                alive[k] = False
                children[k] = []
        parent[best] = above
        children[best] = list(below)
        for c in below:
            parent[c] = best
        if above >= 0:
            children[above] = [best if c == top else c for c in children[above]]
        changed = True
    return changed


def _merge(alive: list[bool], children: list[list[int]], log10_p: list[float]) -> bool:
    """Replace sibling leaves by their parent where the parent is at least as significant as each.

    One bottom-up pass reaches the same fixed point as repeating the rule level by level: a node is
    decided once all its descendants are, and the values never change."""
    changed = False
    for k in range(len(alive) - 1, -1, -1):
        kids = children[k]
        if not alive[k] or not kids or any(children[c] for c in kids):
            continue
        if log10_p[k] <= min(log10_p[c] for c in kids):
            for c in kids:
                alive[c] = False
            children[k] = []
            changed = True
    return changed


def meaningful_leaves(tree: ComponentTree, log10_p: np.ndarray) -> np.ndarray:
    """Boolean [K]: the leaves left after iterating prune and merge until stable."""
    parent = tree.parent.tolist()
    children: list[list[int]] = [[] for _ in parent]
    for k, p in enumerate(parent):
        if p >= 0:
            children[p].append(k)
    alive = [True] * len(parent)
    values = log10_p.tolist()
    while True:
        pruned = _prune(alive, parent, children, values)
        merged = _merge(alive, children, values)
        if not (pruned or merged):
            break
    return np.array([a and not c for a, c in zip(alive, children)], dtype=bool)


def log10_probability_map(
    sum_sq: np.ndarray, channels: int, official_lower_tail: bool = False
) -> np.ndarray:
    """Per-pixel log10 P of the meaningful region holding the pixel (0 outside those regions), [h, w].

    sum_sq: sum over the C latent channels of z^2 at every pixel."""
    tree = component_tree(sum_sq)
    log10_p = tree.size * log10_chi2_tail_bound(tree.level, channels, official_lower_tail)
    leaves = meaningful_leaves(tree, log10_p)
    # A pixel takes the value of the final leaf above its node, if there is one (pixels of pruned
    # or merged nodes lie inside such a leaf's region).
    node_value = np.zeros(len(tree.parent))
    parent = tree.parent
    for k in range(len(parent)):  # top-down
        if leaves[k]:
            node_value[k] = log10_p[k]
        elif parent[k] >= 0:
            node_value[k] = node_value[parent[k]]
    return node_value[tree.pixel_node]


# --- the log NFA map -------------------------------------------------------------------------------


def _upsample(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear (align_corners=False) resize of [N, h, w] maps."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    tensor = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float64))[:, None]
    return F.interpolate(tensor, size=tuple(size), mode="bilinear", align_corners=False)[:, 0].numpy()


def nfa_log_map(
    sum_sq_maps: Sequence[np.ndarray],
    channels: Sequence[int],
    out_size: tuple[int, int],
    official_lower_tail: bool = False,
) -> np.ndarray:
    """log10 NFA map [H, W] of one image. A pixel is detected when the value is below 0.

    sum_sq_maps: per scale, sum_c z^2 [h_s, w_s]; channels: per scale, the latent channels C_s."""
    if len(sum_sq_maps) != len(channels):
        raise ValueError(f"need one channel count per scale: {len(channels)} for {len(sum_sq_maps)} maps")
    per_scale = [
        _upsample(log10_probability_map(m, c, official_lower_tail)[None], out_size)[0]
        for m, c in zip(sum_sq_maps, channels)
    ]
    n_tests = log10_number_of_tests([m.size for m in sum_sq_maps])
    return np.min(np.stack(per_scale), axis=0) + n_tests


def sum_sq_from_log_likelihood(log_likelihood: torch.Tensor | np.ndarray, channels: int) -> np.ndarray:
    """sum_c z^2 from a stored log-likelihood map -0.5 * mean_c z^2: sum_c z^2 = -2 C logp."""
    logp = log_likelihood.numpy() if isinstance(log_likelihood, torch.Tensor) else np.asarray(log_likelihood)
    return -2.0 * channels * logp.astype(np.float64)


def nfa_log_maps(
    log_likelihoods: Sequence[torch.Tensor | np.ndarray],
    channels: Sequence[int],
    out_size: tuple[int, int],
    official_lower_tail: bool = False,
) -> np.ndarray:
    """log10 NFA maps [N, H, W] of a set of images from their per-scale log-likelihood maps
    [N, h_s, w_s] (each -0.5 * mean_c z^2, as every method here stores them)."""
    sum_sq = [sum_sq_from_log_likelihood(m.float() if isinstance(m, torch.Tensor) else m, c)
              for m, c in zip(log_likelihoods, channels)]
    n_images = sum_sq[0].shape[0]
    per_scale = [
        _upsample(np.stack([log10_probability_map(s[i], c, official_lower_tail) for i in range(n_images)]), out_size)
        for s, c in zip(sum_sq, channels)
    ]
    n_tests = log10_number_of_tests([s[0].size for s in sum_sq])
    return np.min(np.stack(per_scale), axis=0) + n_tests
