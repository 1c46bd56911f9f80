"""File key styles -> one per-module form.

Every tensor key of a network file is split into (component, body, suffix):

- component: 'unet', 'te1' or 'te2' (SD1/SD2's single text encoder is 'te1');
- body: the module path inside that component with '.' replaced by '_' (kohya's own spelling, so
  kohya, LyCORIS, diffusers, PEFT and ComfyUI keys of one module meet in one body);
- suffix: the canonical tensor name (`lora_down.weight`, `hada_w1_a`, `alpha`, ...).

Key styles read (research lycoris_formats.md §1, §5):
  kohya / LyCORIS  `lora_unet_<path>`, `lora_te_`, `lora_te1_`, `lora_te2_`, generic `lycoris_<path>`
  diffusers/PEFT   `unet.<path>`, `text_encoder.<path>`, `text_encoder_2.<path>`, `base_model.model.<path>`
                   with `lora_A/lora_B`, `.lora.down/.lora.up`, `lora_linear_layer.down/up`,
                   `lora_magnitude_vector`, and the old attention-processor `…processor.to_q_lora.down`
  ComfyUI          `diffusion_model.<path>`, `model.diffusion_model.<path>`
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

# File suffix -> canonical suffix. Longest match wins (checked longest first).
SUFFIXES: dict = {
    # LoRA family
    "lora_down.weight": "lora_down.weight", "lora_up.weight": "lora_up.weight",
    "lora_mid.weight": "lora_mid.weight",
    "lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",
    "lora_A.default.weight": "lora_down.weight", "lora_B.default.weight": "lora_up.weight",
    "lora.down.weight": "lora_down.weight", "lora.up.weight": "lora_up.weight",
    "lora_linear_layer.down.weight": "lora_down.weight", "lora_linear_layer.up.weight": "lora_up.weight",
    "lora_magnitude_vector": "dora_scale", "lora_magnitude_vector.default": "dora_scale",
    "lora_magnitude_vector.weight": "dora_scale",
    "alpha": "alpha", "scale": "scale", "dora_scale": "dora_scale",
    # LoHa / LoKr
    **{f"hada_{k}": f"hada_{k}" for k in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")},
    **{f"lokr_{k}": f"lokr_{k}" for k in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")},
    # IA3, full, norm, OFT, GLoRA
    "on_input": "on_input", "weight": "weight",
    "diff": "diff", "diff_b": "diff_b", "w_norm": "w_norm", "b_norm": "b_norm",
    "oft_blocks": "oft_blocks", "rescale": "rescale", "oft_R.weight": "oft_R.weight",
    "a1.weight": "a1.weight", "a2.weight": "a2.weight", "b1.weight": "b1.weight", "b2.weight": "b2.weight",
}
_BY_LENGTH = sorted(SUFFIXES, key=len, reverse=True)

# Underscore prefixes (kohya): order matters, longest first.
_UNDERSCORE_PREFIXES = (
    ("lora_unet_", "unet"), ("lora_te1_", "te1"), ("lora_te2_", "te2"), ("lora_te_", "te1"),
    ("lycoris_", "unet"),
)
# Dotted prefixes (diffusers, PEFT, ComfyUI).
_DOTTED_PREFIXES = (
    ("text_encoder_2.", "te2"), ("text_encoder.", "te1"), ("unet.", "unet"),
    ("model.diffusion_model.", "unet"), ("diffusion_model.", "unet"),
    ("base_model.model.", None),   # PEFT: the component is told by what follows
)
# Old diffusers attention processors: `<attn>.processor.to_q_lora.down.weight`.
_ATTN_PROC = re.compile(r"^(?P<attn>.*)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<ud>down|up)\.weight$")

# Keys that belong to no module and are reported as such (bundled textual-inversion embeddings).
_BUNDLE = "bundle_emb."


@dataclass(frozen=True)
class KeyParts:
    component: str   # 'unet' | 'te1' | 'te2'
    body: str        # module path with '_' for '.'
    suffix: str      # canonical suffix
    path: str = ""   # the module path as the key spells it, prefixes removed (PEFT patterns match this)

    @property
    def module(self) -> tuple:
        return (self.component, self.body)


def _split_suffix(key: str) -> Optional[tuple]:
    for s in _BY_LENGTH:
        if key.endswith("." + s):
            return key[: -len(s) - 1], SUFFIXES[s]
    return None


def _guess_component(path: str) -> str:
    """Component of a prefix-less dotted path (PEFT `base_model.model.` or no prefix at all)."""
    if path.startswith(("text_model.", "encoder.layers.", "transformer.resblocks.")):
        return "te1"
    return "unet"


def parse_key(key: str) -> Optional[KeyParts]:
    """Split one file key; None when it is no module tensor we know (the caller reports it)."""
    if key.startswith(_BUNDLE):
        return None
    m = _ATTN_PROC.match(key)
    if m:
        proj = m["proj"] + (".0" if m["proj"] == "to_out" else "")
        key = f"{m['attn']}.{proj}.lora_{m['ud']}.weight"
    split = _split_suffix(key)
    if split is None:
        return None
    module, suffix = split
    if "." not in module:   # kohya style: everything before the first '.' is the module name
        for prefix, comp in _UNDERSCORE_PREFIXES:
            if module.startswith(prefix) and len(module) > len(prefix):
                return KeyParts(comp, module[len(prefix):], suffix, module[len(prefix):])
        return None
    for prefix, comp in _DOTTED_PREFIXES:
        if module.startswith(prefix):
            path = module[len(prefix):]
            if comp is None:
                comp = _guess_component(path)
            if path.startswith("base_model.model."):
                path = path[len("base_model.model."):]
            return KeyParts(comp, path.replace(".", "_"), suffix, path) if path else None
    # A dotted key with no known prefix (e.g. a bare PEFT state dict of one sub-model).
    return KeyParts(_guess_component(module), module.replace(".", "_"), suffix, module)
