"""Bake networks into a checkpoint state dict (the `merge` command; later the export/bake features).

Each touched weight becomes W' = W + Σ_i (W'_i(m_i) − W) (see `compose`), computed in float32 on the
chosen device by the Patcher's own `write_weight` (so a merge and a live patch give the same bits),
written back in the checkpoint's dtype. Works on either layout (see `modelmap`).
"""
from __future__ import annotations

import logging
from typing import Callable, Optional, Sequence

import torch

from .compose import merged_bias
from .modelmap import ModelMap
from .patcher import write_weight
from .network import bind

log = logging.getLogger("lycoris")


def merge_state_dict(sd: dict, networks: Sequence[tuple], device: Optional[str] = None,
                     progress: Optional[Callable[[int, int], None]] = None) -> list:
    """Merge (Network, request) pairs into `sd` in place; returns one LoadReport per network.

    request: anything with `weight(component, block, step, total)` (e.g. `patcher.Strength`); it is
    evaluated at step 1 of 1 with block None (no block weights in a plain merge).
    """
    mm = ModelMap.from_state_dict(sd)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    per_weight: dict = {}
    reports: list = []
    for network, request in networks:
        b = bind(network, mm)
        reports.append(b.report)
        for target, mod in b.pairs:
            m = float(request.weight(target.component, None, 1, 1))
            if m == 0.0:
                continue
            per_weight.setdefault(target.weight, []).append((target, mod.contribution(request.dyn), m))
    total = len(per_weight)
    for i, (name, items) in enumerate(per_weight.items()):
        w = sd[name].to(dev, copy=True)
        base = w.clone()
        bias_name = items[0][0].bias
        has_bias_delta = bias_name is not None and any(c.bias_delta is not None for _, c, _ in items)
        new_b = sd[bias_name].to(dev, copy=True) if has_bias_delta else None
        for rows in {t.rows for t, _, _ in items}:
            sel = [(c, m) for t, c, m in items if t.rows == rows]
            sl = slice(None) if rows is None else slice(rows[0], rows[1])
            write_weight(w[sl], base[sl], [(c, m, c.low_rank(dev)) for c, m in sel])
            if new_b is not None and any(c.bias_delta is not None for c, _ in sel):
                new_b[sl] = merged_bias(new_b[sl].clone(), sel).to(new_b.dtype)
        sd[name] = w.cpu()
        if new_b is not None:
            sd[bias_name] = new_b.cpu()
        if progress:
            progress(i + 1, total)
    return reports
