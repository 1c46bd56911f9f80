"""GLoRA (Chavan et al. 2023, "One-for-All: Generalized LoRA for Parameter-Efficient Fine-tuning";
LyCORIS `GLoRAModule`, the 4.x layout).

File keys: `a1.weight`, `a2.weight`, `b1.weight`, `b2.weight`, `alpha`.
Shapes: a1 (in, r[,1,1]), a2 (r, in[,1,1]), b1 (out, r[,1,1]), b2 (r, in[, k, k]).
ΔW = W·A1·A2 + B1·B2 with A1 = a1 (in, r), A2 = a2 (r, in) acting on W's input axis (Conv: on axis 1);
needs the base weight. rank r = a2.shape[0]; scale = alpha/r.
(A1111's network_glora implements an older layout and cannot read these; research lycoris_formats §3.5.)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from .base import Adapter, Tensor, check, f32, need


@dataclass(frozen=True)
class GLoRA(Adapter):
    a1: Tensor
    a2: Tensor
    b1: Tensor
    b2: Tensor

    algo = "glora"
    markers = frozenset({"a1.weight", "a2.weight", "b1.weight", "b2.weight"})
    keys = markers
    needs_base = True

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor], where: str = "") -> "GLoRA":
        t = {k: need(tensors, f"{k}.weight", where, cls.algo) for k in ("a1", "a2", "b1", "b2")}
        check(all(v.dim() in (2, 4) for v in t.values()), where,
              "GLoRA factors must be 2-D or 4-D: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in t.items()))
        r = t["a2"].shape[0]
        ok = (t["a1"].shape[1] == r and t["a1"].shape[0] == t["a2"].shape[1]
              and t["b1"].shape[1] == r and t["b2"].shape[0] == r)
        check(ok, where, "GLoRA factors disagree: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in t.items()))
        return cls(**t)

    def rank(self) -> int:
        return self.a2.shape[0]

    def out_features(self) -> int:
        return self.b1.shape[0]

    def numel(self) -> int:
        return self.b1.shape[0] * self.b2[0].numel()

    def fits(self, shape: tuple) -> bool:
        return super().fits(shape) and shape[1] == self.a1.shape[0]

    def delta(self, base: Tensor) -> Tensor:
        d = base.device
        a1 = f32(self.a1, d).reshape(self.a1.shape[0], -1)   # (in, r)
        a2 = f32(self.a2, d).reshape(self.a2.shape[0], -1)   # (r, in)
        w = base.float()
        # W·A1·A2 on the input axis: (out, in, ...) x (in, r) x (r, in) -> (out, in, ...)
        wa = torch.einsum("oi...,ij->oj...", torch.einsum("oi...,ij->oj...", w, a1), a2)
        wb = f32(self.b1, d).reshape(self.b1.shape[0], -1) @ f32(self.b2, d).reshape(self.b2.shape[0], -1)
        return wa + wb.reshape(base.shape)
