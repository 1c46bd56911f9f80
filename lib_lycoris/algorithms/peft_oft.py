"""PEFT OFT (PEFT >= 0.15 `OFTConfig`; Qiu et al. 2023 with the Cayley–Neumann series of
Qiu et al. 2025, "Orthogonal Finetuning Made Scalable").

File key: `oft_R.weight` (n_blocks, b·(b−1)/2): the strict upper triangle of each skew block in
`torch.triu_indices(b, b, 1)` order; Q = U − Uᵀ. With the Cayley–Neumann series (PEFT's default,
`num_cayley_neumann_terms` = 5): R = I + 2Q + 2Q² + … + 2Q^(n−2) + Q^(n−1); else R = (I − Q)(I + Q)⁻¹.
W' = W·blockdiag(M)ᵀ on the flattened input features (Conv: in·kh·kw), M = m·R + (1−m)·I
(PEFT itself has no strength; m = 1 is its merge).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from .base import Adapter, Tensor, check, f32, need


def block_size_for(n_elements: int) -> int:
    """b with b·(b−1)/2 = n_elements (0 if none)."""
    b = int(round((1 + (1 + 8 * n_elements) ** 0.5) / 2))
    return b if b * (b - 1) // 2 == n_elements else 0


@dataclass(frozen=True)
class PeftOFT(Adapter):
    r_vec: Tensor
    use_cayley_neumann: bool = True
    neumann_terms: int = 5

    algo = "peft-oft"
    markers = frozenset({"oft_R.weight"})
    keys = markers | {"oft_cayley_neumann", "oft_neumann_terms"}
    additive = False

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor], where: str = "") -> "PeftOFT":
        vec = need(tensors, "oft_R.weight", where, cls.algo)
        check(vec.dim() == 2 and block_size_for(vec.shape[1]) > 1, where,
              f"oft_R.weight {tuple(vec.shape)} is not (blocks, b·(b−1)/2)")
        # `keys` turns the adapter config (file metadata) into these pseudo-keys when present.
        cn = tensors.get("oft_cayley_neumann")
        terms = tensors.get("oft_neumann_terms")
        return cls(r_vec=vec, use_cayley_neumann=True if cn is None else bool(cn.item()),
                   neumann_terms=5 if terms is None else int(terms.item()))


    def block(self) -> int:
        return block_size_for(self.r_vec.shape[1])

    def out_features(self) -> int:
        return -1

    def fits(self, shape: tuple) -> bool:
        n_in = 1
        for s in shape[1:]:
            n_in *= s
        return n_in == self.r_vec.shape[0] * self.block()

    def rotation(self, device: torch.device) -> Tensor:
        """R per block: (n_blocks, b, b) float32."""
        b = self.block()
        vec = f32(self.r_vec, device)
        rows, cols = torch.triu_indices(b, b, 1, device=device)
        q = torch.zeros(vec.shape[0], b, b, device=device, dtype=vec.dtype)
        q[:, rows, cols] = vec
        q = q - q.transpose(-1, -2)
        eye = torch.eye(b, device=device, dtype=vec.dtype).expand_as(q)
        if not self.use_cayley_neumann:
            return torch.linalg.solve(eye + q, eye - q, left=False)
        n = self.neumann_terms
        r = eye.clone()
        if n > 1:
            r = r + 2.0 * q
            if n > 2:
                power = q @ q
                r = r + 2.0 * power
                for _ in range(3, n - 1):
                    power = power @ q
                    r = r + 2.0 * power
                power = power @ q
                r = r + power
        return r

    def rotate(self, base: Tensor, multiplier: float) -> Tensor:
        r = self.rotation(base.device)
        nb, b, _ = r.shape
        if multiplier != 1:
            r = r * multiplier + (1.0 - multiplier) * torch.eye(b, device=base.device, dtype=r.dtype)
        w = base.float().reshape(base.shape[0], nb, b)
        # W' = W·blockdiag(R)ᵀ: (out, nb, b) x (nb, b', b) -> (out, nb, b')
        return torch.einsum("onj,nij->oni", w, r).reshape(base.shape)
