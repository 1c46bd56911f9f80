"""Example networks for the embedded default model, written at first start into the networks folder.

One file per adapter type the engine knows best, with kohya key names (`lora_unet_*`, `lora_te_*`) and
the metadata trainers write (`ss_output_name`, `ss_tag_frequency`, `ss_base_model_version`,
`modelspec.*` incl. `trigger_phrase`), so the Networks panel shows a base-model badge and trigger words.
Factors come from a fixed seed per file: the same bytes (and `Lora hashes`) on every machine. Each file
gets a `<name>.preview.png` (the WebUI's preview convention), rendered with the network at weight 1.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors.torch import save_file

from lib_lycoris.modelmap import ModelMap

log = logging.getLogger("lycoris_app")

RANK = 4


@dataclass(frozen=True)
class Example:
    name: str                 # file stem = what the tag names
    algo: str                 # 'lora' | 'loha' | 'lokr' | 'diag-oft'
    trigger: str
    tags: tuple               # training tags written to ss_tag_frequency
    unet: str                 # regex on kohya module names (UNet) it covers
    te: Optional[str]         # regex on text-encoder module names, None = UNet only
    seed: int
    strength: float           # factor scale: large enough that the image visibly changes


EXAMPLES = (
    Example("inkwash_lora", "lora", "inkwash style", ("ink", "wash", "monochrome"),
            r"attn[12]_to_(q|k|v|out_0)$", r"self_attn_(q|k|v|out)_proj$", 1, 0.35),
    Example("moss_loha", "loha", "mossy", ("moss", "green", "forest floor"),
            r"resnets_\d+_conv[12]$", r"mlp_fc[12]$", 2, 0.35),
    Example("brass_lokr", "lokr", "brass", ("brass", "metal", "steampunk"),
            r"(ff_net_0_proj|ff_net_2|attn2_to_(k|v))$", r"self_attn_(k|v)_proj$", 3, 0.35),
    Example("glass_oft", "diag-oft", "stained glass", ("stained glass", "window"),
            r"(attn1_to_out_0|proj_out)$", None, 4, 0.6),
)


def _factor(n: int) -> tuple:
    """(a, b) with a·b = n, a ≤ b, a as large as possible (the LoKr split)."""
    a = max(d for d in range(1, int(n ** 0.5) + 1) if n % d == 0)
    return a, n // a


def _module(algo: str, shape: tuple, rnd: Callable) -> Optional[dict]:
    """The file tensors of one module of `algo` for a weight of `shape` (None where it does not apply)."""
    out, inn, k = shape[0], shape[1], tuple(shape[2:])
    kk = 1
    for s in k:
        kk *= s
    conv1 = [1, 1] if k else []
    if algo == "lora":     # ΔW = up @ down · alpha/rank
        return {"lora_down.weight": rnd(RANK, inn, *k), "lora_up.weight": rnd(out, RANK, *conv1),
                "alpha": torch.tensor(float(RANK))}
    if algo == "loha":     # ΔW = (w1a @ w1b) ⊙ (w2a @ w2b) · alpha/rank
        return {"hada_w1_a": rnd(out, RANK), "hada_w1_b": rnd(RANK, inn * kk), "hada_w2_a": rnd(out, RANK),
                "hada_w2_b": rnd(RANK, inn * kk), "alpha": torch.tensor(float(RANK))}
    if algo == "lokr":     # ΔW = w1 ⊗ (w2a @ w2b) · alpha/rank
        a, b = _factor(out)
        c, d = _factor(inn)
        return {"lokr_w1": rnd(a, c), "lokr_w2_a": rnd(b, RANK), "lokr_w2_b": rnd(RANK, d * kk),
                "alpha": torch.tensor(float(RANK))}
    if algo == "diag-oft":  # W' = R(blocks)ᵀ W per block of rows; alpha 0 = no constraint
        bs = 8 if out % 8 == 0 else 4
        return {"oft_blocks": rnd(out // bs, bs, bs), "alpha": torch.tensor(0.0)}
    raise ValueError(algo)


def _metadata(ex: Example) -> dict:
    module = {"lora": "networks.lora"}.get(ex.algo, "lycoris.kohya")
    md = {
        "ss_output_name": ex.name,
        "ss_network_module": module,
        "ss_network_dim": str(RANK),
        "ss_network_alpha": str(RANK),
        "ss_base_model_version": "sd_v1",
        "ss_tag_frequency": json.dumps({f"10_{ex.trigger}": {t: 10 - i for i, t in enumerate((ex.trigger,) + ex.tags)}}),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"stable-diffusion-v1/{'lora' if ex.algo == 'lora' else 'lycoris-' + ex.algo}",
        "modelspec.title": ex.name,
        "modelspec.trigger_phrase": ex.trigger,
        "modelspec.description": "example network for the embedded default model of lycoris_app",
    }
    if module == "lycoris.kohya":
        md["ss_network_args"] = json.dumps({"algo": ex.algo})
    return md


def write_example(ex: Example, model_root: torch.nn.Module, path: Path) -> Path:
    """Write one example network for the model under `model_root` (diffusers-named children)."""
    mm = ModelMap.from_module(model_root)
    g = torch.Generator().manual_seed(ex.seed)
    rnd = lambda *s: torch.randn(*s, generator=g) * ex.strength   # noqa: E731
    sd = {}
    for t in mm.targets:
        if t.rows is not None or len(t.shape) not in (2, 4):
            continue
        pattern = ex.unet if t.component == "unet" else ex.te
        if pattern is None or not re.search(pattern, t.name):
            continue
        tensors = _module(ex.algo, t.shape, rnd)
        # kohya writes SD1's text encoder as `lora_te_`; the engine accepts both.
        name = re.sub(r"^lora_te1_", "lora_te_", t.name)
        for suffix, v in (tensors or {}).items():
            sd[f"{name}.{suffix}"] = v.contiguous()
    if not sd:
        raise ValueError(f"example {ex.name}: no module of the model matches")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(sd, str(tmp), metadata=_metadata(ex))
    tmp.chmod(0o644)
    tmp.replace(path)
    return path


def ensure_examples(networks_dir: Path, model_root: torch.nn.Module,
                    render: Optional[Callable[[Example], object]] = None) -> list:
    """Write the example networks (and previews, if `render` gives a PIL image) that are missing."""
    written = []
    for ex in EXAMPLES:
        path = networks_dir / f"{ex.name}.safetensors"
        if not path.exists():
            write_example(ex, model_root, path)
            written.append(path)
            log.info("wrote example network %s", path)
        preview = networks_dir / f"{ex.name}.preview.png"
        if render is not None and not preview.exists():
            render(ex).save(preview)
    return written
