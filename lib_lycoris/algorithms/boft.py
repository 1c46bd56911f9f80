"""Butterfly OFT (Liu et al. 2023, "Parameter-Efficient Orthogonal Finetuning via Butterfly
Factorization"; LyCORIS `ButterflyOFTModule`).

File keys: `oft_blocks` (stages, nb, b, b) with nb·b = out and stages = log2(nb) + 1, `alpha` (constraint
factor; the constraint is alpha·out), optional `rescale` (out, 1[, 1, 1]).
R = Cayley per (stage, block), ‖Q‖_F over the whole tensor clipped to the constraint; each stage i is
interpolated R_i <- m·R_i + (1−m)·I, then applied to the rows of W permuted in butterfly order with
k = 2^i·b/2; finally W' ⊙ rescale. Follows lycoris/functional/boft.py `_diff_weight` (4.1.3).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import torch

from .base import Adapter, Tensor, cayley, check, f32, need, oft_extras


@dataclass(frozen=True)
class BOFT(Adapter):
    blocks: Tensor
    rescale: Optional[Tensor] = None
    constraint_factor: float = 0.0

    algo = "boft"
    markers = frozenset({"oft_blocks"})
    keys = markers | {"rescale"}
    additive = False

    @classmethod
    def accepts(cls, tensors: Mapping[str, Tensor]) -> bool:
        return tensors["oft_blocks"].dim() == 4

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor], where: str = "") -> "BOFT":
        blocks = need(tensors, "oft_blocks", where, cls.algo)
        check(blocks.dim() == 4 and blocks.shape[2] == blocks.shape[3] and blocks.shape[2] % 2 == 0, where,
              f"oft_blocks {tuple(blocks.shape)} must be (stages, blocks, size, size) with an even size")
        rescale, constraint = oft_extras(tensors, blocks.shape[1] * blocks.shape[2], where, cls.algo)
        return cls(blocks=blocks, rescale=rescale, constraint_factor=constraint)


    def out_features(self) -> int:
        return self.blocks.shape[1] * self.blocks.shape[2]

    def fits(self, shape: tuple) -> bool:
        return shape[0] == self.out_features()

    def rotate(self, base: Tensor, multiplier: float) -> Tensor:
        stages, _, b, _ = self.blocks.shape
        r = cayley(f32(self.blocks, base.device), self.constraint_factor * base.shape[0])
        eye = torch.eye(b, device=base.device, dtype=r.dtype)
        x = base.float()
        for i in range(stages):
            ri = r[i] if multiplier == 1 else r[i] * multiplier + (1.0 - multiplier) * eye
            k = 2 ** i * b // 2
            # rows into butterfly order: (-1, 2, k) -> swap -> blocks of b rows
            x = x.unflatten(0, (-1, 2, k)).transpose(1, 2).flatten(0, 2).unflatten(0, (-1, b))
            x = torch.einsum("bij,bj...->bi...", ri, x)   # (nb, b, b) x (nb, b, ...) -> (nb, b, ...)
            x = x.flatten(0, 1).unflatten(0, (-1, k, 2)).transpose(1, 2).flatten(0, 2)
        if self.rescale is not None:
            x = x * f32(self.rescale, base.device).reshape(-1, *([1] * (base.dim() - 1)))
        return x
