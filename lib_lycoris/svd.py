"""The linear algebra of export, extract and resize: SVD of ΔW given as factors or dense, rank choice,
the water-filling of a size budget and the measured error of what is written.

A module's ΔW (out × in·kh·kw) reaches this file in one of two forms:

- factors U (out × R) @ V (R × in): a stack of LoRAs, and LoHa/LoKr in their exact low-rank forms (see
  `export.factor_form`). `factor_svd` gives its exact thin SVD from the QR of U and of Vᵀ and the SVD of
  the small R × R core R_U·R_Vᵀ: cost O((out + in)·R² + R³) instead of O(out·in·min(out, in)) for the dense
  matrix (the algorithm of `torch.svd_lowrank`'s second stage, here without any approximation since the
  range of U is known exactly);
- dense: `dense_svd` runs `torch.linalg.svd` (exact, every singular value), or `torch.svd_lowrank` (Halko,
  Martinsson & Tropp 2011, "Finding structure with randomness", algorithm 4.4: `niter` power iterations,
  `q` = rank + oversampling) when only the top `rank` values are asked for and q is small next to
  min(out, in).

Eckart–Young(–Mirsky): the truncated SVD U_k S_k V_kᵀ is the best rank-k approximation in Frobenius norm,
with error² = Σ_{i>k} s_i². ‖ΔW‖_F² is always taken from the matrix itself (never from the top-q values of a
randomized SVD, which would overstate what a truncation keeps: SD.Next's `lora_extract` does that).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

Tensor = torch.Tensor

# Power iterations of `torch.svd_lowrank` on dense ΔW (Halko et al. §4.5). Measured at rank 32 of 640 × 2560 with
# the oversampling below, error over the optimum: Gaussian 0.37 %, spectrum 1/√i 0.06 %, rank 64 + noise (a
# fine-tune's shape) 0.65 %; with 2 iterations (SD.Next's choice) 0.78 %, 0.44 %, 2.2 %. The CLI's --niter
# overrides it.
NITER = 4
# svd_lowrank's oversampling: q = k + max(OVERSAMPLE_MIN, k·OVERSAMPLE_FRACTION) (Halko et al. §4.2: p = 5-10
# for a fixed rank; more for larger k).
OVERSAMPLE_MIN = 10
OVERSAMPLE_FRACTION = 0.25
# Above this fraction of min(out, in), q makes svd_lowrank no cheaper than the exact SVD: use the exact one.
LOWRANK_MAX_FRACTION = 0.25
# Relative singular-value cutoff of the numerical rank: s_i ≤ s_0·max(out, in)·eps(float32) is zero (the
# default rtol of `torch.linalg.matrix_rank`), so `--rank 32` of a rank-4 module writes rank 4, not noise.
RANK_RTOL_EPS = torch.finfo(torch.float32).eps
# Rough flop counts (multiplications) of the LAPACK routines, to pick the cheaper path: Householder QR of
# an n × R matrix ≈ 2nR² (with Q formed), the SVD of an m × n matrix (m ≤ n, vectors) ≈ 4m²n + 8m³
# (Golub & Van Loan, "Matrix Computations", 4th ed., table 8.6.1).
QR_FLOPS = 2.0
SVD_FLOPS_MN = 4.0
SVD_FLOPS_M3 = 8.0


@dataclass
class Factorization:
    """A (possibly truncated) thin SVD of one (out, in) ΔW: ΔW ≈ u @ diag(s) @ vᵀ.

    s: (q,) descending, on the compute device; total: ‖ΔW‖_F² (float, exact); complete: s holds every nonzero
    singular value (then the optimal error of any rank is known); method: how it was computed, for the report.
    The singular vectors are either given (`u` (out, q), `v` (in, q), dense SVDs) or kept as Householder QRs
    and the core's vectors (`factor_svd`), and only the k columns a caller keeps are ever formed (`split`).
    """

    s: Tensor
    total: float
    complete: bool
    method: str
    shape: tuple
    u: Optional[Tensor] = None
    v: Optional[Tensor] = None
    _qr: Optional[tuple] = None     # ((a_u, tau_u, core_u (R, R)), (a_v, tau_v, core_v (R, R)), (up, down))

    def numerical_rank(self) -> int:
        """How many singular values are above the float32 noise floor (see RANK_RTOL_EPS)."""
        if self.s.numel() == 0 or float(self.s[0]) <= 0.0:
            return 0
        tol = float(self.s[0]) * max(self.shape) * RANK_RTOL_EPS
        return int((self.s > tol).sum())

    def tail(self, k: int) -> Optional[float]:
        """The optimal squared error at rank k, Σ_{i>k} s_i² (Eckart–Young; summed, not total − kept, which
        would cancel to noise near full rank); None when `s` is incomplete."""
        if not self.complete:
            return None
        return float((self.s[k:].double() ** 2).sum())

    def split(self, k: int) -> tuple:
        """(up (out, k), down (k, in)) = (u_k·√s_k, √s_k·v_kᵀ): the singular values shared evenly between the
        two factors, so that neither leaves the fp16/bf16 range first. k ≤ the numerical rank.

        From a factor SVD, the singular vectors of the smaller side are formed (ormqr, O(n·R·k)) and the other
        side is the projection of ΔW on them (√s_k·v_kᵀ = s_k^-½·u_kᵀ·up·down, two thin GEMMs), which is cheaper
        than a second ormqr on the larger side."""
        root = self.s[:k].clamp_min(0).sqrt()
        if self._qr is None:
            return self.u[:, :k] * root, (self.v[:, :k] * root).T.contiguous()
        (au, tu, uc), (av, tv, vc), (up, down) = self._qr
        if self.shape[0] <= self.shape[1]:
            u = _apply_q(au, tu, uc[:, :k])                          # (out, k)
            return u * root, ((u.T @ up) @ down) / root[:, None]     # (k, R) @ (R, in)
        v = _apply_q(av, tv, vc[:, :k])                              # (in, k)
        return up @ (down @ v) / root, (v * root).T.contiguous()     # (out, R) @ (R, k)


def _apply_q(a: Tensor, tau: Tensor, small: Tensor) -> Tensor:
    """Q[:, :R] @ small for the Householder QR (a, tau) of an (n, R) matrix: LAPACK ormqr on [small; 0], which
    costs O(n·R·k) and never forms Q (n × R)."""
    n, r = a.shape
    padded = small.new_zeros(n, small.shape[1])
    padded[:r] = small
    return torch.ormqr(a, tau, padded)


# --------------------------------------------------------------------------------------------------
# SVDs

def _r_factor(a: Tensor) -> Tensor:
    r = a.shape[1]
    return a[:r].triu()


def factor_svd(up: Tensor, down: Tensor) -> Factorization:
    """Exact thin SVD of up @ down without forming it: up = Q_u R_u, downᵀ = Q_v R_v (Householder, `geqrf`),
    svd(R_u R_vᵀ) = Ũ S Ṽᵀ; then u = Q_u Ũ and v = Q_v Ṽ, formed only for the columns kept (`split`).
    up (out, R), down (R, in) with R < min(out, in); cost O((out + in)·R² + R³)."""
    au, tu = torch.geqrf(up)                       # up (out, R) = Q_u R_u
    av, tv = torch.geqrf(down.T)                   # downᵀ (in, R) = Q_v R_v
    uc, s, vch = torch.linalg.svd(_r_factor(au) @ _r_factor(av).T)   # core (R, R): ‖core‖_F = ‖up @ down‖_F
    total = float((s.double() ** 2).sum())
    return Factorization(s=s, total=total, complete=True, method=f"factor R={up.shape[1]}",
                         shape=(up.shape[0], down.shape[1]), _qr=((au, tu, uc), (av, tv, vch.T), (up, down)))


def factor_svdvals(up: Tensor, down: Tensor) -> tuple:
    """(singular values, ‖up @ down‖_F²) of up @ down: only the R factors of the two QRs and the core's values."""
    s = torch.linalg.svdvals(_r_factor(torch.geqrf(up)[0]) @ _r_factor(torch.geqrf(down.T)[0]).T)
    return s, float((s.double() ** 2).sum())


def oversampled(k: int, limit: int) -> int:
    """svd_lowrank's q for a wanted rank k (see OVERSAMPLE_*), at most `limit`."""
    return min(limit, k + max(OVERSAMPLE_MIN, int(math.ceil(k * OVERSAMPLE_FRACTION))))


def dense_svd(w: Tensor, rank: Optional[int] = None, niter: int = NITER) -> Factorization:
    """Thin SVD of a dense (out, in) matrix: the top `rank` (+ oversampling) by `torch.svd_lowrank` when that
    is small next to min(out, in) (see LOWRANK_MAX_FRACTION), else exact (`torch.linalg.svd`, every value)."""
    m = min(w.shape)
    total = float((w.double() ** 2).sum()) if w.dtype != torch.float64 else float((w ** 2).sum())
    if rank is not None:
        q = oversampled(rank, m)
        if q <= LOWRANK_MAX_FRACTION * m:
            u, s, v = torch.svd_lowrank(w, q=q, niter=niter)
            return Factorization(s=s, total=total, complete=False, method=f"svd_lowrank q={q} niter={niter}",
                                 shape=tuple(w.shape), u=u, v=v)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return Factorization(s=s, total=total, complete=True, method="svd", shape=tuple(w.shape), u=u, v=vh.T)


def factor_cheaper(out: int, inner: int, rank: int) -> bool:
    """Whether the factor-space SVD of an (out, inner) product of inner dimension `rank` costs less than forming
    it and taking the dense SVD (flop model of QR_FLOPS / SVD_FLOPS_*)."""
    m, n = min(out, inner), max(out, inner)
    if rank >= m:
        return False
    factor = 2 * QR_FLOPS * (out + inner) * rank ** 2 + (SVD_FLOPS_MN + SVD_FLOPS_M3) * rank ** 3
    dense = out * inner * rank + SVD_FLOPS_MN * m * m * n + SVD_FLOPS_M3 * m ** 3
    return factor < dense


# --------------------------------------------------------------------------------------------------
# Rank choice

def rank_for_energy(s: Tensor, total: float, fraction: float) -> int:
    """The smallest k with Σ_{i≤k} s_i² ≥ fraction·total (len(s) if the values given never reach it)."""
    if total <= 0.0:
        return 0
    kept = torch.cumsum(s.double() ** 2, 0)
    hit = torch.nonzero(kept >= fraction * total)
    return int(hit[0]) + 1 if hit.numel() else int(s.numel())


def rank_for_tolerance(s: Tensor, total: float, rel_tol: float) -> int:
    """The smallest k with error² = total − Σ_{i≤k} s_i² ≤ (rel_tol)²·total (the --exact cut)."""
    return rank_for_energy(s, total, 1.0 - rel_tol ** 2)


@dataclass(frozen=True)
class Allocation:
    """Water-filling result: rank per module and the bytes of lora_up/lora_down it takes."""

    ranks: tuple
    bytes: int
    kept: float      # Σ of the kept s_i² over every module


def water_fill(spectra: Sequence[Tensor], unit_bytes: Sequence[int], budget: int) -> Allocation:
    """Ranks per module that keep the most Σ s_i² within `budget` bytes, where rank k of module j costs
    k·unit_bytes[j]: the next rank always goes where it removes the most squared error per byte.

    Singular values are sorted, so each module's gains per byte fall with k and taking ranks in the order of
    s²/bytes over all modules keeps each module's ranks a prefix. A rank that no longer fits closes its module
    (its next ranks cost the same and gain less); smaller modules may still take ranks after it.
    """
    gains, owners = [], []
    for j, (s, b) in enumerate(zip(spectra, unit_bytes)):
        if s.numel():
            gains.append((s.double() ** 2) / b)
            owners.append(torch.full((s.numel(),), j, dtype=torch.long))
    ranks = [0] * len(spectra)
    if not gains:
        return Allocation(tuple(ranks), 0, 0.0)
    gain = torch.cat(gains)
    owner = torch.cat(owners)
    order = torch.argsort(gain, descending=True, stable=True)
    used, kept = 0, 0.0
    closed = set()
    for i in order.tolist():
        j = int(owner[i])
        if j in closed:
            continue
        if used + unit_bytes[j] > budget:
            closed.add(j)
            if len(closed) == len(spectra):
                break
            continue
        used += unit_bytes[j]
        kept += float(gain[i]) * unit_bytes[j]
        ranks[j] += 1
    return Allocation(tuple(ranks), used, kept)


# --------------------------------------------------------------------------------------------------
# Measured error

def lowrank_sq_norm(left: Tensor, right: Tensor) -> float:
    """‖left @ right‖_F² = tr((leftᵀ left)(right rightᵀ)) in float64, without the (out, in) product:
    left (out, R), right (R, in)."""
    a, b = left.double(), right.double()
    return max(float(((a.T @ a) * (b @ b.T)).sum()), 0.0)


def residual_sq(up_in: Tensor, down_in: Tensor, total: float, up: Tensor, down: Tensor, precise: bool = False) -> float:
    """‖up_in @ down_in − up @ down‖_F² from small products: total − 2⟨ΔW, A⟩ + ‖A‖², with
    ⟨ΔW, A⟩ = Σ (up_inᵀ up) ⊙ (down_in downᵀ) (both (R, k)); `total` = ‖ΔW‖_F². Cost O((out + in)·R·k), R and k
    the two inner dimensions. The products run in float32 (good to ~1e-7·total) or, `precise`, float64
    (~1e-16·total): callers redo it precisely where the error is small next to total (see export)."""
    if precise:
        up_in, down_in, up, down = up_in.double(), down_in.double(), up.double(), down.double()
    cross = float(((up_in.T @ up) * (down_in @ down.T)).double().sum())
    return max(total - 2.0 * cross + lowrank_sq_norm(up, down), 0.0)


def clamp_quantile(up: Tensor, down: Tensor, quantile: float) -> tuple:
    """Both factors clamped to ±h, h the `quantile` of the absolute values of their elements together (kohya
    `extract_lora_from_models.py --clamp_quantile`, there on the signed values of U·S and Vᵀ)."""
    flat = torch.cat([up.reshape(-1), down.reshape(-1)]).abs().float()
    k = max(1, min(flat.numel(), int(math.ceil(quantile * flat.numel()))))
    h = float(torch.kthvalue(flat.cpu(), k).values)
    return up.clamp(-h, h), down.clamp(-h, h)
