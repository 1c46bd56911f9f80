"""LoKr (Yeh et al. 2023, "Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to Model
Evaluation"; LyCORIS `LokrModule`): Kronecker product of a small and a large factor.

File keys: `lokr_w1` or (`lokr_w1_a`, `lokr_w1_b`); `lokr_w2` or (`lokr_w2_a`, `lokr_w2_b`), optional
`lokr_t2` (Tucker on the large factor).
Shapes: out = a·b, in = c·d. w1 (a, c) = w1_a (a, r) · w1_b (r, c). w2 (b, d[, k, k]), or
w2_a (b, r) · w2_b (r, d·k·k), or Tucker T(t2 (r, r, k, k), w2_a (r, b), w2_b (r, d)) -> (b, d, k, k).
ΔW = kron(w1, w2) reshaped to W (w1 unsqueezed to w2's rank).
rank r = w1_b.shape[0] or w2_b.shape[0] or t2.shape[0]; scale = alpha/r; no low-rank side at all -> scale 1
(LyCORIS saves alpha = r then; PEFT LoKr files differ and are scaled by `keys` from their config).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import torch

from .base import Adapter, Tensor, check, f32, rebuild_tucker
from ..errors import FormatError


@dataclass(frozen=True)
class LoKr(Adapter):
    w1: Optional[Tensor] = None
    w1_a: Optional[Tensor] = None
    w1_b: Optional[Tensor] = None
    w2: Optional[Tensor] = None
    w2_a: Optional[Tensor] = None
    w2_b: Optional[Tensor] = None
    t2: Optional[Tensor] = None

    algo = "lokr"
    markers = frozenset({"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"})
    keys = markers | {"lokr_t2"}
    supports_dora = True

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor], where: str = "") -> "LoKr":
        t = {k: tensors.get(f"lokr_{k}") for k in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")}
        have = sorted(tensors)
        if not (t["w1"] is not None or (t["w1_a"] is not None and t["w1_b"] is not None)):
            raise FormatError(f"LoKr module needs lokr_w1 or lokr_w1_a + lokr_w1_b (has: {', '.join(have)})",
                              key=where, keys=have)
        if not (t["w2"] is not None or (t["w2_a"] is not None and t["w2_b"] is not None)):
            raise FormatError(f"LoKr module needs lokr_w2 or lokr_w2_a + lokr_w2_b (has: {', '.join(have)})",
                              key=where, keys=have)
        check(all(v is None or v.dim() >= 2 for v in t.values()), where, "LoKr factors must be 2-D or 4-D: " +
              ", ".join(f"lokr_{k} {tuple(v.shape)}" for k, v in t.items() if v is not None))
        a = cls(**t)
        # Shapes must chain; computing the factor shapes checks them without touching values.
        try:
            a._shapes()
        except (RuntimeError, ValueError, IndexError) as e:
            raise FormatError(f"LoKr factor shapes do not chain ({e})", key=where,
                              keys=have) from e
        return a

    def _shapes(self) -> tuple:
        """(a, c) of w1 and (b, d, *kernel) of w2, checking the inner dimensions."""
        if self.w1 is not None:
            check(self.w1.dim() == 2, "", f"lokr_w1 {tuple(self.w1.shape)} must be 2-D")
            w1 = tuple(self.w1.shape)
        else:
            check(self.w1_a.shape[1] == self.w1_b.shape[0], "",
                  f"lokr_w1_a {tuple(self.w1_a.shape)} x lokr_w1_b {tuple(self.w1_b.shape)}")
            w1 = (self.w1_a.shape[0], self.w1_b.shape[1])
        if self.w2 is not None:
            w2 = tuple(self.w2.shape)
        elif self.t2 is not None:
            r = self.t2.shape[0]
            check(self.w2_a.shape[0] == r and self.w2_b.shape[0] == r and self.t2.shape[1] == r, "",
                  f"lokr_t2 {tuple(self.t2.shape)} vs w2_a {tuple(self.w2_a.shape)}, w2_b {tuple(self.w2_b.shape)}")
            w2 = (self.w2_a.shape[1], self.w2_b.shape[1], *self.t2.shape[2:])
        else:
            check(self.w2_a.shape[1] == self.w2_b.shape[0], "",
                  f"lokr_w2_a {tuple(self.w2_a.shape)} x lokr_w2_b {tuple(self.w2_b.shape)}")
            w2 = (self.w2_a.shape[0], self.w2_b.shape[1])
        return w1, w2

    def rank(self) -> Optional[int]:
        for f in (self.w1_b, self.w2_b, self.t2):
            if f is not None:
                return f.shape[0]
        return None

    def out_features(self) -> int:
        w1, w2 = self._shapes()
        return w1[0] * w2[0]

    def numel(self) -> int:
        w1, w2 = self._shapes()
        n = w1[0] * w1[1]
        for s in w2:
            n *= s
        return n

    def factor_pair(self, device: torch.device) -> tuple:
        """(w1 (a, c), w2 (b, d[, k, k]) or (b, d·k·k)) in float32."""
        w1 = f32(self.w1, device) if self.w1 is not None else f32(self.w1_a, device) @ f32(self.w1_b, device)
        if self.w2 is not None:
            w2 = f32(self.w2, device)
        elif self.t2 is not None:
            w2 = rebuild_tucker(f32(self.t2, device), f32(self.w2_a, device), f32(self.w2_b, device))
        else:
            w2 = f32(self.w2_a, device) @ f32(self.w2_b, device)
        return w1, w2

    def delta(self, base: Tensor) -> Tensor:
        w1, w2 = self.factor_pair(base.device)
        while w1.dim() < w2.dim():
            w1 = w1.unsqueeze(-1)
        return torch.kron(w1, w2).reshape(base.shape)
