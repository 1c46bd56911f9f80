"""Synthetic networks of every adapter type for a given model (random factors, real key names).

Used where a test needs a network fast and checks *our own* invariants (restore is exact, merge equals
bypass, apply twice is a no-op); numerical correctness against the official code is test_engine's job.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

import torch
from safetensors.torch import load_file, save_file

from lib_lycoris.modelmap import ModelMap

RANK = 4
TYPES = ("lora", "locon-tucker", "loha", "lokr", "ia3", "glora", "full", "diag-oft", "boft", "lora-dora",
         "norm")


def _factor(n: int) -> tuple:
    """(a, b) with a·b = n, a ≤ b, a as large as possible (the LoKr split)."""
    a = max(d for d in range(1, int(n ** 0.5) + 1) if n % d == 0)
    return a, n // a


def module_tensors(kind: str, shape: tuple, g: torch.Generator, has_bias: bool = False) -> Optional[dict]:
    """The tensors one module of `kind` has for a weight of `shape` (None where the type cannot apply)."""
    r = RANK
    out = shape[0]
    conv = len(shape) == 4
    k = shape[2:] if conv else ()
    inn = shape[1] if len(shape) > 1 else 0
    rnd = lambda *s: torch.randn(*s, generator=g) * 0.1  # noqa: E731
    if kind == "norm":
        return {"w_norm": rnd(out), "b_norm": rnd(out)} if len(shape) == 1 else None
    if len(shape) == 1:
        return None
    kk = 1
    for s in k:
        kk *= s
    if kind in ("lora", "lora-dora"):
        t = {"lora_down.weight": rnd(r, inn, *k), "lora_up.weight": rnd(out, r, *([1, 1] if conv else [])),
             "alpha": torch.tensor(2.0)}
        if kind == "lora-dora":
            t["dora_scale"] = rnd(out, *([1] * (len(shape) - 1))).abs() + 1
        return t
    if kind == "locon-tucker":
        if not conv or k == (1, 1):
            return None
        return {"lora_down.weight": rnd(r, inn, 1, 1), "lora_mid.weight": rnd(r, r, *k),
                "lora_up.weight": rnd(out, r, 1, 1), "alpha": torch.tensor(3.0)}
    if kind == "loha":
        return {"hada_w1_a": rnd(out, r), "hada_w1_b": rnd(r, inn * kk), "hada_w2_a": rnd(out, r),
                "hada_w2_b": rnd(r, inn * kk), "alpha": torch.tensor(2.0)}
    if kind == "lokr":
        a, b = _factor(out)
        c, d = _factor(inn)
        return {"lokr_w1": rnd(a, c), "lokr_w2_a": rnd(b, r), "lokr_w2_b": rnd(r, d * kk), "alpha": torch.tensor(2.0)}
    if kind == "ia3":
        return {"weight": rnd(out), "on_input": torch.tensor(0.0)}
    if kind == "glora":
        return {"a1.weight": rnd(inn, r, *([1, 1] if conv else [])), "a2.weight": rnd(r, inn, *([1, 1] if conv else [])),
                "b1.weight": rnd(out, r, *([1, 1] if conv else [])), "b2.weight": rnd(r, inn, *k),
                "alpha": torch.tensor(2.0)}
    if kind == "full":
        t = {"diff": rnd(*shape)}
        if has_bias:
            t["diff_b"] = rnd(out)
        return t
    if kind == "diag-oft":
        bs = 4 if out % 4 == 0 else 2
        return {"oft_blocks": rnd(out // bs, bs, bs), "alpha": torch.tensor(0.0)}
    if kind == "boft":
        b = 4
        nb = out // b
        if out % b or nb & (nb - 1):
            return None
        stages = nb.bit_length()   # log2(nb) + 1
        return {"oft_blocks": rnd(stages, nb, b, b), "alpha": torch.tensor(0.0)}
    raise ValueError(kind)


def make_network(path: Path, model: torch.nn.Module, kind: str, seed: int = 0, limit: Optional[int] = None,
                 components: Iterable[str] = ("unet", "te1", "te2"), dtype=torch.float32) -> Path:
    """Write a kohya-named network of `kind` covering the model's weights (up to `limit` modules)."""
    mm = ModelMap.from_module(model)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    n = 0
    for t in mm.targets:
        if t.component not in components or t.rows is not None or "embed" in t.name:
            continue
        tensors = module_tensors(kind, t.shape, g, has_bias=t.bias is not None)
        if tensors is None:
            continue
        for suffix, v in tensors.items():
            sd[f"{t.name}.{suffix}"] = v.to(dtype) if v.is_floating_point() else v
        n += 1
        if limit and n >= limit:
            break
    save_file(sd, str(path))
    return path


def kohya_modules(path: Path) -> dict:
    """module name -> {suffix: float64 tensor} of a kohya-style file, read raw (te1 spelled `lora_te_`): the
    tests' independent view of what a written file holds."""
    out: dict = {}
    for k, v in load_file(str(path)).items():
        name, suffix = k.split(".", 1)
        out.setdefault(name.replace("lora_te1_", "lora_te_"), {})[suffix] = v.double()
    return out
