"""LoRA / LoCon / DyLoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation"; LyCORIS `LoConModule`).

File keys: `lora_down.weight`, `lora_up.weight`, optional `lora_mid.weight` (Tucker/CP conv), `alpha`,
`scale`; PEFT `lora_A/lora_B` are renamed to these by `keys`.
Shapes: Linear down (r, in), up (out, r); Conv k×k down (r, in, k, k), up (out, r, 1, 1) (DyLoRA saves
a 2-D up on convs); Tucker down (r, in, 1, 1), mid (r, r, k, k), up (out, r, 1, 1).
ΔW = up·down (flattened, reshaped to W), Tucker ΔW[o,c] = Σ_ij up[o,i]·mid[i,j]·down[j,c].
rank r = down.shape[0]; scale = alpha/r, or the `scale` key where a file stores it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import torch

from .base import Adapter, Tensor, check, f32, need


@dataclass(frozen=True)
class LoRA(Adapter):
    up: Tensor
    down: Tensor
    mid: Optional[Tensor] = None
    stored_scale: Optional[float] = None   # the `scale` key (overrides alpha/r)
    full_rank: Optional[int] = None        # rank before a `dyn` slice: the scale keeps using it

    algo = "lora"
    markers = frozenset({"lora_up.weight", "lora_down.weight"})
    keys = markers | {"lora_mid.weight", "scale"}
    supports_dora = True

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor], where: str = "") -> "LoRA":
        up = need(tensors, "lora_up.weight", where, cls.algo)
        down = need(tensors, "lora_down.weight", where, cls.algo)
        mid = tensors.get("lora_mid.weight")
        check(down.dim() in (2, 4) and up.dim() in (2, 4), where,
              f"lora_down {tuple(down.shape)} / lora_up {tuple(up.shape)} must be 2-D or 4-D")
        r = down.shape[0]
        check(up.shape[1] == r, where, f"lora_up {tuple(up.shape)} does not match rank {r} of lora_down")
        check(up.dim() == 2 or up.shape[2:] == (1, 1), where, f"lora_up {tuple(up.shape)} is not 1×1")
        if mid is not None:
            check(mid.dim() == 4 and mid.shape[:2] == (r, r) and down.dim() == 4 and down.shape[2:] == (1, 1),
                  where, f"Tucker lora_mid {tuple(mid.shape)} does not fit rank {r} / down {tuple(down.shape)}")
        scale = tensors.get("scale")
        return cls(up=up, down=down, mid=mid,
                   stored_scale=None if scale is None else float(scale.float().reshape(-1)[0]))

    def rank(self) -> int:
        return self.full_rank or self.down.shape[0]

    def scale_for(self, alpha: Optional[float]) -> float:
        if self.stored_scale is not None:
            return self.stored_scale
        return super().scale_for(alpha)

    def out_features(self) -> int:
        return self.up.shape[0]

    def kernel(self) -> tuple:
        src = self.mid if self.mid is not None else self.down
        return tuple(src.shape[2:]) if src.dim() == 4 else ()

    def numel(self) -> int:
        k = 1
        for s in self.kernel():
            k *= s
        return self.up.shape[0] * self.down.shape[1] * k

    def sliced(self, dyn: Optional[int]) -> "LoRA":
        """DyLoRA `dyn=N`: only the first N ranks (the scale keeps alpha/full rank, as A1111 does)."""
        r = self.down.shape[0]
        if dyn is None or dyn >= r or dyn <= 0 or self.mid is not None:
            return self
        return LoRA(up=self.up[:, :dyn], down=self.down[:dyn], stored_scale=self.stored_scale, full_rank=r)

    def rows(self, start: int, stop: int) -> "LoRA":
        """ΔW rows [start, stop): up's rows (up·down and the Tucker rebuild are row-wise in up)."""
        return LoRA(up=self.up[start:stop], down=self.down, mid=self.mid, stored_scale=self.stored_scale,
                    full_rank=self.full_rank)

    def factors(self, device: torch.device) -> tuple:
        """(up2d (out, r), down2d (r, in·k·k)) in float32 with ΔW = up2d @ down2d; Tucker folded into down."""
        up = f32(self.up, device).reshape(self.up.shape[0], -1)
        down = f32(self.down, device)
        if self.mid is not None:
            # (r, r, kh, kw) × (r, in) -> (r, in, kh, kw): fold the core into the down factor
            mid = f32(self.mid, device)
            down = torch.einsum("ij...,jc->ic...", mid, down.flatten(1))
        return up, down.reshape(down.shape[0], -1)

    def delta(self, base: Tensor) -> Tensor:
        up, down = self.factors(base.device)
        return (up @ down).reshape(base.shape)
