"""Norm-layer deltas (LyCORIS `NormModule`, `train_norm=True`): LayerNorm / GroupNorm affine parameters.

File keys: `w_norm` (C,), `b_norm` (C,). W' = W + m·w_norm, b' = b + m·b_norm. No alpha.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

from .base import Adapter, Tensor, check, f32


@dataclass(frozen=True)
class Norm(Adapter):
    w_norm: Optional[Tensor] = None
    b_norm: Optional[Tensor] = None

    algo = "norm"
    markers = frozenset({"w_norm", "b_norm"})
    keys = markers
    has_bias_delta = True

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor], where: str = "") -> "Norm":
        w, b = tensors.get("w_norm"), tensors.get("b_norm")
        check(all(t is None or t.dim() >= 1 for t in (w, b)), where, "w_norm / b_norm must be vectors, not scalars")
        return cls(w_norm=w, b_norm=b)


    def out_features(self) -> int:
        return (self.w_norm if self.w_norm is not None else self.b_norm).shape[0]

    def numel(self) -> int:
        return self.out_features()

    def fits(self, shape: tuple) -> bool:
        n = 1
        for s in shape:
            n *= s
        return n == self.out_features()

    def delta(self, base: Tensor) -> Optional[Tensor]:
        if self.w_norm is None:
            return None
        return f32(self.w_norm, base.device).reshape(base.shape)

    def bias_delta(self) -> Optional[Tensor]:
        return self.b_norm
