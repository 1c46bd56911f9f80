"""Diagonal OFT (Qiu et al. 2023, "Controlling Text-to-Image Diffusion by Orthogonal Finetuning";
LyCORIS `DiagOFTModule`, kohya `networks.oft` files use the same keys).

File keys: `oft_blocks` (nb, bs, bs) with nb·bs = out, `alpha` (the constraint; 0 = none), optional
`rescale` (out, 1[, 1, 1]).
R = Cayley(oft_blocks) with ‖Q‖_F clipped to alpha·out; M = m·R + (1−m)·I per block;
W'_k = M_kᵀ·W_k on each block k of output rows; W' = rescale ⊙ W' (rescale is not interpolated).
Follows lycoris/modules/diag_oft.py `make_weight` (4.1.3).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import torch

from .base import Adapter, Tensor, cayley, check, f32, need, oft_extras


@dataclass(frozen=True)
class DiagOFT(Adapter):
    blocks: Tensor
    rescale: Optional[Tensor] = None
    constraint_factor: float = 0.0   # the file's `alpha`; the constraint is alpha·out

    algo = "diag-oft"
    markers = frozenset({"oft_blocks"})
    keys = markers | {"rescale"}
    additive = False

    @classmethod
    def accepts(cls, tensors: Mapping[str, Tensor]) -> bool:
        return tensors["oft_blocks"].dim() == 3

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor], where: str = "") -> "DiagOFT":
        blocks = need(tensors, "oft_blocks", where, cls.algo)
        check(blocks.dim() == 3 and blocks.shape[1] == blocks.shape[2], where,
              f"oft_blocks {tuple(blocks.shape)} must be (blocks, size, size)")
        rescale, constraint = oft_extras(tensors, blocks.shape[0] * blocks.shape[1], where, cls.algo)
        return cls(blocks=blocks, rescale=rescale, constraint_factor=constraint)


    def out_features(self) -> int:
        return self.blocks.shape[0] * self.blocks.shape[1]

    def fits(self, shape: tuple) -> bool:
        return shape[0] == self.out_features()

    def rotate(self, base: Tensor, multiplier: float) -> Tensor:
        nb, bs, _ = self.blocks.shape
        r = cayley(f32(self.blocks, base.device), self.constraint_factor * base.shape[0])
        eye = torch.eye(bs, device=base.device, dtype=r.dtype)
        m = r * multiplier + (1.0 - multiplier) * eye
        w = base.float().reshape(nb, bs, *base.shape[1:])
        # (nb, bs, bs) x (nb, bs, ...) -> (nb, bs, ...): W'_k = M_kᵀ W_k
        out = torch.einsum("knm,kn...->km...", m, w).reshape(base.shape)
        if self.rescale is not None:
            out = f32(self.rescale, base.device).reshape(-1, *([1] * (base.dim() - 1))) * out
        return out
