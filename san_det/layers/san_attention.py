"""SAM: the self-attention module of SAN (Zhao, Jia, Koltun, "Exploring Self-attention for Image
Recognition", CVPR 2020), pairwise and patchwise, with every relation of the paper.

Submodule names and parameter shapes follow the official code (github hszhao/SAN,
``model/san.py``), so released checkpoints load 1:1 into the official relations:

- ``conv1`` (phi), ``conv2`` (psi): 1x1 convs ``in_planes -> rel_planes`` with bias.
- ``conv3`` (beta): 1x1 conv ``in_planes -> out_planes`` with bias.
- ``conv_w`` (gamma): ``Sequential(BN, ReLU, Conv 1x1 no bias, BN, ReLU, Conv 1x1 with bias)``.
- ``conv_p`` (pairwise only): 1x1 conv ``2 -> 2`` mapping pixel coordinates normalised to [-1, 1].

Notation: ``x`` is (N, in_planes, H, W); ``R = rel_planes``; ``Cw = out_planes // share_planes``
attention-weight channels (output channel ``c`` uses weight channel ``c % Cw``); ``K = k*k`` taps
of the ``k x k`` footprint with ``padding = dilation * (k // 2)``; ``L = Ho * Wo`` output positions.
The output is (N, out_planes, Ho, Wo), ``Ho = ceil(H / stride)``.

Pairwise (Sec. 3.1): ``y_i = sum_j softmax_j(gamma([delta(x_i, x_j), p_i - p_j])) (.) beta(x_j)``.
``delta`` gives (N, D, K, L), the position term (N, 2, K, L), ``gamma`` maps ``D + 2 -> R -> Cw``
channels and the softmax runs over the K taps. Relations (``relation=``):

==================  =====================================  ======  ==============================
relation            delta(x_i, x_j)                        D       note
==================  =====================================  ======  ==============================
``subtraction``     ``phi(x_i) - psi(x_j)``                R       official, :func:`subtraction2`
``summation``       ``phi(x_i) + psi(x_j)``                R       ``-subtraction2(-phi, psi)``
``concatenation``   ``[phi(x_i), psi(x_j)]``               2R
``hadamard``        ``phi(x_i) * psi(x_j)``                R
``dot``             ``phi(x_i) . psi(x_j)`` (over R)       1       no 1/sqrt(R) scaling: gamma
                                                                   starts with a BatchNorm
==================  =====================================  ======  ==============================

Patchwise (Sec. 3.2): ``y_i = sum_j gamma(delta(x_R(i)))_j (.) beta(x_j)``; ``gamma`` maps
``D -> Cw -> K * Cw`` channels, reshaped to (N, Cw, K, L) weights; no softmax and no position term
(as in the official code). ``delta`` is a (N, D, 1, L) tensor:

==================  ==============================================  ========  ==================
relation            delta(x_R(i))                                   D         note
==================  ==============================================  ========  ==================
``concatenation``   ``[phi(x_i), psi(x_j) for j in R(i)]``          R(K + 1)  official
``star``            ``[phi(x_i) . psi(x_j) for j in R(i)]``         K         no scaling
``clique``          ``[phi(x_j) . psi(x_l) for j, l in R(i)]``      K * K     ordered (j, l) pairs
==================  ==============================================  ========  ==================

In the concatenation the neighbours are ordered channel-major (``r * K + t``), as the official
``nn.Unfold`` orders them, so official checkpoints keep their BatchNorm statistics. The official
patchwise code pads with ``kernel_size // 2`` whatever the dilation; here the footprint is the same
dilated window as the aggregation's (identical for ``dilation=1``), and ``pad_mode`` applies to it.

Neighbours outside the image follow ``pad_mode``: "reflect" (official; needs ``padding < H, W``)
or "zeros".
"""

from typing import Callable, Tuple, Union

import torch
import torch.nn as nn

from .checks import check_choice, check_int, check_odd_int
from .ops import PAD_MODES, aggregation, neighbourhood, subtraction, subtraction2

__all__ = ["SAM", "PAIRWISE_RELATIONS", "PATCHWISE_RELATIONS", "position_grid"]

PAIRWISE_RELATIONS = ("subtraction", "summation", "concatenation", "hadamard", "dot")
PATCHWISE_RELATIONS = ("concatenation", "star", "clique")
_SA_TYPES = {0: 0, 1: 1, "pairwise": 0, "patchwise": 1}


def position_grid(height: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """Pixel coordinates normalised to [-1, 1]: (1, 2, H, W), channel 0 = column, 1 = row."""
    cols = torch.linspace(-1.0, 1.0, width, dtype=like.dtype, device=like.device)
    rows = torch.linspace(-1.0, 1.0, height, dtype=like.dtype, device=like.device)
    return torch.stack([cols.expand(height, width), rows[:, None].expand(height, width)])[None]


def _gamma(
    in_ch: int, mid_ch: int, out_ch: int, norm_layer: Callable[[int], nn.Module]
) -> nn.Sequential:
    """Norm - ReLU - 1x1 conv (no bias) - norm - ReLU - 1x1 conv, the official ``conv_w`` layout
    (with BatchNorm)."""
    return nn.Sequential(
        norm_layer(in_ch),
        nn.ReLU(inplace=True),
        nn.Conv2d(in_ch, mid_ch, kernel_size=1, bias=False),
        norm_layer(mid_ch),
        nn.ReLU(inplace=True),
        nn.Conv2d(mid_ch, out_ch, kernel_size=1),
    )


class SAM(nn.Module):
    """SAN's self-attention module (pairwise or patchwise); see the module docstring.

    Args:
        sa_type: 0 or "pairwise", 1 or "patchwise" (the official ``sa_type``).
        in_planes: input channels.
        rel_planes: channels of phi and psi (the official blocks use ``in_planes // 16``).
        out_planes: output channels (beta); a multiple of ``out_planes // share_planes``.
        share_planes: how many output channels share one attention-weight channel.
        kernel_size: odd footprint size ``k``.
        stride: output stride (1 in the official networks).
        dilation: footprint dilation.
        relation: pairwise: "subtraction" (default), "summation", "concatenation", "hadamard",
            "dot"; patchwise: "concatenation" (default), "star", "clique".
        pad_mode: "reflect" (official) or "zeros".
        norm_layer: callable ``channels -> nn.Module`` for the two normalisations of ``conv_w``
            (official: ``nn.BatchNorm2d``).

    Shape:
        (N, in_planes, H, W) -> (N, out_planes, ceil(H / stride), ceil(W / stride)).
    """

    def __init__(
        self,
        sa_type: Union[int, str],
        in_planes: int,
        rel_planes: int,
        out_planes: int,
        share_planes: int,
        kernel_size: int = 3,
        stride: int = 1,
        dilation: int = 1,
        *,
        relation: str = None,
        pad_mode: str = "reflect",
        norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
    ):
        super().__init__()
        if sa_type not in _SA_TYPES:
            raise ValueError(f"sa_type must be 0/'pairwise' or 1/'patchwise', got {sa_type!r}")
        self.sa_type = _SA_TYPES[sa_type]
        for name, value in (
            ("in_planes", in_planes),
            ("rel_planes", rel_planes),
            ("out_planes", out_planes),
            ("share_planes", share_planes),
            ("stride", stride),
            ("dilation", dilation),
        ):
            check_int(name, value)
        check_odd_int("kernel_size", kernel_size)
        weight_planes = out_planes // share_planes
        if weight_planes < 1 or out_planes % weight_planes != 0:
            raise ValueError(
                f"out_planes ({out_planes}) must be a multiple of out_planes // share_planes "
                f"({weight_planes}), which must be >= 1"
            )
        check_choice("pad_mode", pad_mode, PAD_MODES)
        relations = PAIRWISE_RELATIONS if self.sa_type == 0 else PATCHWISE_RELATIONS
        relation = relations[0] if relation is None else relation
        if relation not in relations:
            kind = "pairwise" if self.sa_type == 0 else "patchwise"
            raise ValueError(
                f"relation for {kind} SAM must be one of {relations}, got {relation!r}"
            )
        self.relation = relation
        self.kernel_size, self.stride, self.dilation = kernel_size, stride, dilation
        self.padding = dilation * (kernel_size // 2)
        self.pad_mode = pad_mode
        self.rel_planes, self.out_planes, self.weight_planes = rel_planes, out_planes, weight_planes

        self.conv1 = nn.Conv2d(in_planes, rel_planes, kernel_size=1)
        self.conv2 = nn.Conv2d(in_planes, rel_planes, kernel_size=1)
        self.conv3 = nn.Conv2d(in_planes, out_planes, kernel_size=1)
        taps = kernel_size * kernel_size
        if self.sa_type == 0:
            delta_planes = {"concatenation": 2 * rel_planes, "dot": 1}.get(relation, rel_planes)
            self.conv_w = _gamma(delta_planes + 2, rel_planes, weight_planes, norm_layer)
            self.conv_p = nn.Conv2d(2, 2, kernel_size=1)
        else:
            delta_planes = {
                "concatenation": rel_planes * (taps + 1),
                "star": taps,
                "clique": taps * taps,
            }[relation]
            self.conv_w = _gamma(delta_planes, weight_planes, taps * weight_planes, norm_layer)

    @property
    def _geometry(self) -> Tuple[int, int, int, int, str]:
        return self.kernel_size, self.stride, self.padding, self.dilation, self.pad_mode

    def extra_repr(self) -> str:
        kind = "pairwise" if self.sa_type == 0 else "patchwise"
        return (
            f"{kind}, relation={self.relation}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, dilation={self.dilation}, pad_mode={self.pad_mode}"
        )

    def _centre(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, C, 1, L): the centre pixel of every output position."""
        s = self.stride
        centre = x[:, :, ::s, ::s]
        return centre.reshape(x.shape[0], x.shape[1], 1, centre.shape[2] * centre.shape[3])

    def _pairwise_weights(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x1.shape
        geo = self._geometry
        if self.relation == "subtraction":
            delta = subtraction2(x1, x2, *geo)
        elif self.relation == "summation":
            delta = -subtraction2(-x1, x2, *geo)
        else:
            centre, nbrs = self._centre(x1), neighbourhood(x2, *geo)
            if self.relation == "concatenation":
                delta = torch.cat([centre.expand_as(nbrs), nbrs], dim=1)
            elif self.relation == "hadamard":
                delta = centre * nbrs
            else:  # dot
                delta = (centre * nbrs).sum(dim=1, keepdim=True)
        pos = subtraction(self.conv_p(position_grid(h, w, x1)), *geo)
        pos = pos.expand(n, -1, -1, -1)
        return torch.softmax(self.conv_w(torch.cat([delta, pos], dim=1)), dim=-2)

    def _patchwise_weights(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        n = x1.shape[0]
        geo = self._geometry
        nbrs = neighbourhood(x2, *geo)  # (N, R, K, L)
        rel, taps, positions = nbrs.shape[1:]
        if self.relation == "concatenation":
            delta = torch.cat([self._centre(x1), nbrs.reshape(n, rel * taps, 1, positions)], dim=1)
        elif self.relation == "star":
            delta = (self._centre(x1) * nbrs).sum(dim=1).unsqueeze(2)
        else:  # clique
            delta = torch.einsum("nrjl,nrml->njml", neighbourhood(x1, *geo), nbrs)
            delta = delta.reshape(n, taps * taps, 1, positions)
        return self.conv_w(delta).view(n, self.weight_planes, taps, positions)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2, x3 = self.conv1(x), self.conv2(x), self.conv3(x)
        if self.sa_type == 0:
            w = self._pairwise_weights(x1, x2)
        else:
            w = self._patchwise_weights(x1, x2)
        # Under autocast the softmax computes in float32 while the values are half precision.
        return aggregation(x3, w.to(x3.dtype), *self._geometry)
