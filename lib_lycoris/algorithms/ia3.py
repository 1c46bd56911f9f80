"""IA3 (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning"; LyCORIS `IA3Module`): a learned per-channel rescaling of the weight.

File keys: `weight`, `on_input`. Shapes: Linear `weight` (out,) or (in,) if on_input; Conv (1, out, 1, 1)
or (1, in, 1, 1). W' = W ⊙ (1 + m·w) broadcast over output rows (or input columns), i.e. additive with
ΔW = W ⊙ w (needs the base weight). No alpha.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from .base import Adapter, Tensor, check, f32, need


@dataclass(frozen=True)
class IA3(Adapter):
    w: Tensor
    on_input: bool = False

    algo = "ia3"
    markers = frozenset({"on_input"})
    keys = markers | {"weight"}
    needs_base = True

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor], where: str = "") -> "IA3":
        w = need(tensors, "weight", where, cls.algo)
        on_input = bool(float(need(tensors, "on_input", where, cls.algo).float().reshape(-1)[0]) != 0.0)
        check(w.numel() > 0 and sum(1 for s in w.shape if s != 1) <= 1, where,
              f"IA3 weight {tuple(w.shape)} must be a vector")
        return cls(w=w, on_input=on_input)

    def out_features(self) -> int:
        return -1  # any: `fits` checks the channel axis instead

    def numel(self) -> int:
        return self.w.numel()

    def fits(self, shape: tuple) -> bool:
        return len(shape) >= 2 and shape[1 if self.on_input else 0] == self.w.numel()

    def rows(self, start: int, stop: int) -> "IA3":
        """ΔW rows [start, stop): the output scales of those rows; an input-side scale acts on every row."""
        return self if self.on_input else IA3(w=self.w.reshape(-1)[start:stop], on_input=False)

    def delta(self, base: Tensor) -> Tensor:
        w = f32(self.w, base.device).reshape(-1)
        view = [1] * base.dim()
        view[1 if self.on_input else 0] = -1
        return base.float() * w.reshape(view)
