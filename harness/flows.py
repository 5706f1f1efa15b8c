"""Flow building blocks shared by the methods.

The reference implementations of MSFlow, CFlow, FastFlow and U-Flow all compose FrEIA 0.2
``AllInOneBlock``s (affine coupling with a soft clamp, a SOFTPLUS global affine scale and a fixed
channel permutation). We use FrEIA's own block and sequence container, so the block semantics are
exactly those of 0.2, and add what the methods need around it:

- a positional encoding used as the flow condition (CFlow-AD style, also used by MSFlow),
- subnet constructors (conv-norm-ReLU-conv, fully connected, alternating 3x3/1x1 kernels),
- permutations drawn from an explicit generator instead of NumPy's global one, so a model is a
  deterministic function of its seed and building it leaves the global random state untouched,
- ``FlowOutput``, what every method's forward returns.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import FrEIA.framework as Ff
import FrEIA.modules as Fm
import numpy as np
import torch
from torch import Tensor, nn

from harness.errors import ConfigError

SubnetConstructor = Callable[[int, int], nn.Module]
SUBNET_NORMS = ("ln", "bn", "none")


@dataclass
class FlowOutput:
    """Latents of a flow (one tensor per scale) and the log-determinant of its Jacobian per sample."""

    latents: list[Tensor]
    log_jac_det: Tensor  # [B]


# --- condition ---------------------------------------------------------------------------------


def positional_encoding_2d(
    channels: int,
    height: int,
    width: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Fixed 2D sinusoidal position code [channels, height, width], identical for every image.

    The first half of the channels encodes the column (x) index, the second half the row (y)
    index. Within a half, channel 2i holds sin(pos * f_i) and channel 2i+1 holds cos(pos * f_i),
    with frequencies f_i = 10000^(-2i / (channels/2)), i = 0 .. channels/4 - 1 (CFlow-AD, MSFlow).
    """
    if channels <= 0 or channels % 4 != 0:
        raise ConfigError(
            f"positional encoding channels must be a positive multiple of 4, got {channels}; "
            "set the method's condition channels (e.g. cond_channels) accordingly"
        )
    half = channels // 2
    frequencies = torch.exp(torch.arange(0, half, 2, dtype=torch.float64) * -(math.log(1e4) / half))
    x_angles = torch.arange(width, dtype=torch.float64)[:, None] * frequencies  # [W, half/2]
    y_angles = torch.arange(height, dtype=torch.float64)[:, None] * frequencies  # [H, half/2]

    code = torch.zeros(channels, height, width, dtype=torch.float64)
    code[0:half:2] = torch.sin(x_angles).T[:, None, :].expand(-1, height, -1)
    code[1:half:2] = torch.cos(x_angles).T[:, None, :].expand(-1, height, -1)
    code[half::2] = torch.sin(y_angles).T[:, :, None].expand(-1, -1, width)
    code[half + 1 :: 2] = torch.cos(y_angles).T[:, :, None].expand(-1, -1, width)
    return code.to(device=device, dtype=dtype or torch.get_default_dtype())


# --- subnets -----------------------------------------------------------------------------------


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map, applied channels-last (affine, eps 1e-5)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def channel_norm(norm: str, channels: int) -> nn.Module:
    """The normalisation placed between the two convolutions of a coupling subnet."""
    if norm == "ln":
        return ChannelLayerNorm(channels, eps=1e-5, elementwise_affine=True)
    if norm == "bn":
        return nn.BatchNorm2d(channels)
    if norm == "none":
        return nn.Identity()
    raise ConfigError(f"subnet norm must be one of {SUBNET_NORMS}, got {norm!r}")


def conv_subnet(norm: str = "ln", kernel_size: int = 3, hidden_ratio: float = 1.0) -> SubnetConstructor:
    """conv(k) c_in -> hidden, norm, ReLU, conv(k) hidden -> c_out; 'same' zero padding, biases,
    PyTorch default initialisation. MSFlow: k=3, hidden = c_in, norm 'ln'. FastFlow: norm 'none'."""
    channel_norm(norm, 1)  # validate early, before any block is built

    def build(c_in: int, c_out: int) -> nn.Module:
        hidden = int(c_in * hidden_ratio)
        padding = kernel_size // 2
        return nn.Sequential(
            nn.Conv2d(c_in, hidden, kernel_size, padding=padding),
            channel_norm(norm, hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, c_out, kernel_size, padding=padding),
        )

    return build


def alternating_conv_subnets(
    n_blocks: int, hidden_ratio: float = 1.0, conv3x3_only: bool = False, norm: str = "none"
) -> list[SubnetConstructor]:
    """One constructor per block: 3x3 kernels on even blocks, 1x1 on odd ones (FastFlow, U-Flow)."""
    return [
        conv_subnet(norm, 3 if (i % 2 == 0 or conv3x3_only) else 1, hidden_ratio) for i in range(n_blocks)
    ]


def fc_subnet(hidden_ratio: float = 2.0) -> SubnetConstructor:
    """Linear d_in -> hidden_ratio*d_in, ReLU, Linear -> d_out, for flows on feature vectors (CFlow)."""

    def build(d_in: int, d_out: int) -> nn.Module:
        hidden = int(d_in * hidden_ratio)
        return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))

    return build


# --- permutations and seeding ------------------------------------------------------------------


def random_permutation(n: int, generator: torch.Generator) -> Tensor:
    return torch.randperm(n, generator=generator)


def random_rotation(n: int, generator: torch.Generator) -> Tensor:
    """A random matrix from SO(n) (QR of a Gaussian matrix with the sign fix; det flipped to +1)."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    if torch.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def permutation_matrix(perm: Tensor) -> Tensor:
    """Matrix W with (W x)_i = x_perm[i], the form FrEIA's AllInOneBlock stores."""
    w = torch.zeros(len(perm), len(perm), dtype=torch.float64)
    w[torch.arange(len(perm)), perm] = 1.0
    return w


def set_block_permutation(block: Fm.AllInOneBlock, matrix: Tensor) -> None:
    """Replace the fixed channel mixing of an AllInOneBlock (FrEIA draws it from NumPy's global
    generator; we draw it from an explicit one). matrix: [C, C], orthogonal."""
    with torch.no_grad():
        block.w_perm.copy_(matrix.reshape(block.w_perm.shape))
        block.w_perm_inv.copy_(matrix.T.reshape(block.w_perm_inv.shape))


@contextlib.contextmanager
def seeded_construction(seed: int) -> Iterator[torch.Generator]:
    """Build modules with torch's CPU generator seeded by ``seed`` (weight initialisation) and
    yield a separate generator for permutations; restore torch's and NumPy's global state after."""
    numpy_state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            yield torch.Generator().manual_seed(seed)
        finally:
            np.random.set_state(numpy_state)


class ChannelPermutation(nn.Module):
    """A fixed channel permutation of an NCHW (or NC) tensor; volume preserving (log-det 0)."""

    def __init__(self, channels: int, generator: torch.Generator):
        super().__init__()
        perm = random_permutation(channels, generator)
        self.register_buffer("perm", perm)
        self.register_buffer("perm_inv", torch.argsort(perm))

    def forward(self, x: Tensor, rev: bool = False) -> Tensor:
        return x[:, self.perm_inv] if rev else x[:, self.perm]


# --- block sequences ---------------------------------------------------------------------------


def all_in_one_flow(
    dims: Sequence[int],
    n_blocks: int,
    subnets: SubnetConstructor | Sequence[SubnetConstructor],
    generator: torch.Generator,
    clamp: float,
    cond_channels: int = 0,
    global_affine_type: str = "SOFTPLUS",
    permute_soft: bool = False,
) -> Ff.SequenceINN:
    """A FrEIA SequenceINN of ``n_blocks`` AllInOneBlocks (FrEIA 0.2 semantics).

    dims: the declared shape without batch, e.g. (C, 1, 1) for a fully convolutional flow on
    maps of any size (FrEIA 0.2 does not check the runtime size), or (C,) for feature vectors.
    With cond_channels > 0 every block takes condition 0, concatenated to its subnet input.
    Each block's permutation (hard, or a random rotation if permute_soft) comes from ``generator``.
    """
    if isinstance(subnets, Sequence):
        constructors = list(subnets)
        if len(constructors) != n_blocks:
            raise ConfigError(f"need one subnet constructor per block: {len(constructors)} for {n_blocks} blocks")
    else:
        constructors = [subnets] * n_blocks

    flow = Ff.SequenceINN(*dims)
    channels = dims[0]
    cond_shape = (cond_channels, *dims[1:])
    for subnet in constructors:
        condition = dict(cond=0, cond_shape=cond_shape) if cond_channels else {}
        flow.append(
            Fm.AllInOneBlock,
            subnet_constructor=subnet,
            affine_clamping=clamp,
            global_affine_type=global_affine_type,
            permute_soft=False,  # FrEIA would draw it from NumPy's global generator; set below
            **condition,
        )
        block = flow.module_list[-1]
        mixing = random_rotation(channels, generator) if permute_soft else permutation_matrix(
            random_permutation(channels, generator)
        )
        set_block_permutation(block, mixing)
    return flow


# --- couplings over several scales at once (CS-Flow; MSFlow's fusion flow) ---------------------

MultiScaleSubnetConstructor = Callable[[list[int], list[int]], nn.Module]


def soft_clamp(s: Tensor, clamp: float) -> Tensor:
    """Bound log-scales to about +-clamp: clamp * 0.636 * atan(s / clamp) (0.636 ~ 2/pi)."""
    return clamp * 0.636 * torch.atan(s / clamp)


class ParallelAffineCoupling(nn.Module):
    """Two-sided affine coupling applied to every scale at once, with subnets that see all scales.

    Each scale splits into x1 (first C//2 channels) and x2 (the rest):
        y1 = x1 * exp(e(s2)) + t2,   [s2 | t2] = subnet_2(x2 of every scale)
        y2 = x2 * exp(e(s1)) + t1,   [s1 | t1] = subnet_1(y1 of every scale)
    with the soft clamp e. A subnet is built as ``constructor(in_channels, out_channels)`` (one
    entry per scale) and maps a list of tensors to a list with twice the out channels: log-scales
    first, then shifts. The forward output is clamped to +-1e6 (as CS-Flow). log-det per sample =
    sum of e(s1) and e(s2) over channels, pixels and scales.
    """

    def __init__(self, channels: Sequence[int], subnet_constructor: MultiScaleSubnetConstructor, clamp: float):
        super().__init__()
        self.first = [c // 2 for c in channels]
        self.second = [c - c // 2 for c in channels]
        self.clamp = clamp
        self.subnet_2 = subnet_constructor(self.second, [2 * c for c in self.first])  # sees x2, moves x1
        self.subnet_1 = subnet_constructor(self.first, [2 * c for c in self.second])  # sees y1, moves x2

    def _scale_and_shift(self, subnet: nn.Module, xs: list[Tensor], sizes: list[int]):
        outputs = subnet(xs)
        log_scales = [soft_clamp(out[:, :n], self.clamp) for out, n in zip(outputs, sizes)]
        shifts = [out[:, n:] for out, n in zip(outputs, sizes)]
        return log_scales, shifts

    def forward(self, xs: Sequence[Tensor], rev: bool = False) -> tuple[list[Tensor], Tensor]:
        halves = [torch.split(x, [a, b], dim=1) for x, a, b in zip(xs, self.first, self.second)]
        u1, u2 = [h[0] for h in halves], [h[1] for h in halves]
        if not rev:
            e2, t2 = self._scale_and_shift(self.subnet_2, u2, self.first)
            v1 = [x * torch.exp(e) + t for x, e, t in zip(u1, e2, t2)]
            e1, t1 = self._scale_and_shift(self.subnet_1, v1, self.second)
            v2 = [x * torch.exp(e) + t for x, e, t in zip(u2, e1, t1)]
            out = [torch.clamp(torch.cat(pair, dim=1), -1e6, 1e6) for pair in zip(v1, v2)]
            sign = 1.0
        else:
            e1, t1 = self._scale_and_shift(self.subnet_1, u1, self.second)
            v2 = [(y - t) * torch.exp(-e) for y, e, t in zip(u2, e1, t1)]
            e2, t2 = self._scale_and_shift(self.subnet_2, v2, self.first)
            v1 = [(y - t) * torch.exp(-e) for y, e, t in zip(u1, e2, t2)]
            out = [torch.cat(pair, dim=1) for pair in zip(v1, v2)]
            sign = -1.0
        log_jac_det = sum(e.sum(dim=(1, 2, 3)) for e in e1 + e2)
        return out, sign * log_jac_det
