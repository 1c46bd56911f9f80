"""LoHa (Hyeon-Woo et al. 2022, "FedPara"; LyCORIS `LohaModule`): Hadamard product of two low-rank products.

File keys: `hada_w1_a`, `hada_w1_b`, `hada_w2_a`, `hada_w2_b`, optional `hada_t1`, `hada_t2` (Tucker).
Shapes: w*_a (out, r), w*_b (r, in·k·k); Tucker: w*_a (r, out), w*_b (r, in), t* (r, r, k, k).
ΔW = (w1_a·w1_b) ⊙ (w2_a·w2_b); Tucker ΔW = T(t1, w1_a, w1_b) ⊙ T(t2, w2_a, w2_b).
rank r = w1_b.shape[0]; scale = alpha/r (once: the forward semantics, not LyCORIS' merge_to, which
applies it twice; research lycoris_formats.md §7 quirk 1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import torch

from .base import Adapter, Tensor, check, f32, need, rebuild_tucker


@dataclass(frozen=True)
class LoHa(Adapter):
    w1_a: Tensor
    w1_b: Tensor
    w2_a: Tensor
    w2_b: Tensor
    t1: Optional[Tensor] = None
    t2: Optional[Tensor] = None

    algo = "loha"
    markers = frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"})
    keys = markers | {"hada_t1", "hada_t2"}
    supports_dora = True

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor], where: str = "") -> "LoHa":
        t = {k: need(tensors, f"hada_{k}", where, cls.algo) for k in ("w1_a", "w1_b", "w2_a", "w2_b")}
        t1, t2 = tensors.get("hada_t1"), tensors.get("hada_t2")
        check((t1 is None) == (t2 is None), where, "LoHa Tucker needs both hada_t1 and hada_t2")
        for k, v in t.items():
            check(v.dim() == 2, where, f"hada_{k} {tuple(v.shape)} must be 2-D")
        r = t["w1_b"].shape[0]
        if t1 is None:
            check(t["w1_a"].shape[1] == r and t["w2_a"].shape == t["w1_a"].shape
                  and t["w2_b"].shape == t["w1_b"].shape, where,
                  f"LoHa factors disagree: w1_a {tuple(t['w1_a'].shape)}, w1_b {tuple(t['w1_b'].shape)}, "
                  f"w2_a {tuple(t['w2_a'].shape)}, w2_b {tuple(t['w2_b'].shape)}")
        else:
            check(t1.dim() == 4 and t1.shape[:2] == (r, r) and t2.shape == t1.shape
                  and t["w1_a"].shape[0] == r and t["w2_a"].shape == t["w1_a"].shape, where,
                  f"LoHa Tucker factors disagree: t1 {tuple(t1.shape)}, w1_a {tuple(t['w1_a'].shape)}")
        return cls(t1=t1, t2=t2, **t)

    def rank(self) -> int:
        return self.w1_b.shape[0]

    def out_features(self) -> int:
        return self.w1_a.shape[1] if self.t1 is not None else self.w1_a.shape[0]

    def numel(self) -> int:
        if self.t1 is not None:
            return self.out_features() * self.w1_b.shape[1] * self.t1.shape[2] * self.t1.shape[3]
        return self.w1_a.shape[0] * self.w1_b.shape[1]

    def hadamard(self, base: Tensor, out: Optional[tuple] = None) -> tuple:
        d = base.device
        if self.t1 is not None:
            w1 = rebuild_tucker(f32(self.t1, d), f32(self.w1_a, d), f32(self.w1_b, d))
            w2 = rebuild_tucker(f32(self.t2, d), f32(self.w2_a, d), f32(self.w2_b, d))
        elif out is not None:
            n, shape = base.numel(), (self.w1_a.shape[0], self.w1_b.shape[1])
            w1 = torch.mm(f32(self.w1_a, d), f32(self.w1_b, d), out=out[0][:n].view(shape))
            w2 = torch.mm(f32(self.w2_a, d), f32(self.w2_b, d), out=out[1][:n].view(shape))
        else:
            w1 = f32(self.w1_a, d) @ f32(self.w1_b, d)
            w2 = f32(self.w2_a, d) @ f32(self.w2_b, d)
        return w1.reshape(base.shape), w2.reshape(base.shape)

    def rows(self, start: int, stop: int) -> "LoHa":
        """ΔW rows [start, stop): both products are row-wise in their `a` factors (w_a rows; Tucker: w_a
        columns, which index the output there)."""
        if self.t1 is not None:
            return LoHa(w1_a=self.w1_a[:, start:stop], w1_b=self.w1_b, w2_a=self.w2_a[:, start:stop],
                        w2_b=self.w2_b, t1=self.t1, t2=self.t2)
        return LoHa(w1_a=self.w1_a[start:stop], w1_b=self.w1_b, w2_a=self.w2_a[start:stop], w2_b=self.w2_b)

    def delta(self, base: Tensor) -> Tensor:
        w1, w2 = self.hadamard(base)
        return w1 * w2
