"""File key styles -> one per-module form.

Every tensor key of a network file is split into (component, body, suffix):

- component: 'unet' (the denoiser: UNet, SD3 MMDiT or Flux transformer), 'te1', 'te2' or 'te3'
  (SD1/SD2's single text encoder is 'te1'; CLIP-L 'te1', CLIP-G 'te2', T5-XXL always 'te3', as kohya
  names them for SD3 and Flux);
- body: the module path inside that component with '.' replaced by '_' (kohya's own spelling, so
  kohya, LyCORIS, diffusers, PEFT and ComfyUI keys of one module meet in one body);
- suffix: the canonical tensor name (`lora_down.weight`, `hada_w1_a`, `alpha`, ...).

Key styles read (research lycoris_formats.md §1, §5):
  kohya / LyCORIS  `lora_unet_<path>`, `lora_te_`, `lora_te1_`, `lora_te2_`, `lora_te3_`, generic `lycoris_<path>`,
                   OneTrainer `lora_transformer_<diffusers path>`
  A1111 SD3        `clip_l_transformer_`, `clip_g_transformer_`, `t5xxl_transformer_` (its layer names)
  diffusers/PEFT   `unet.<path>`, `transformer.<path>`, `text_encoder(_2|_3).<path>`, `base_model.model.<path>`
                   with `lora_A/lora_B`, `.lora.down/.lora.up`, `lora_linear_layer.down/up`,
                   `lora_magnitude_vector`, and the old attention-processor `…processor.to_q_lora.down`
  ComfyUI          `diffusion_model.<path>`, `model.diffusion_model.<path>`, `text_encoders.{clip_l,clip_g,t5xxl}.`
  XLabs (Flux)     `double_blocks.N.processor.{qkv,proj}_lora{1,2}.{down,up}.weight` (1 = image, 2 = text
                   stream), `single_blocks.N.processor.{qkv,proj}_lora.{down,up}.weight`

A T5 module path (`encoder.block.N…`, `shared`) is 'te3' whatever the prefix says (diffusers' Flux
pipeline calls T5 `text_encoder_2`).
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
    ("lora_unet_", "unet"), ("lora_te1_", "te1"), ("lora_te2_", "te2"), ("lora_te3_", "te3"), ("lora_te_", "te1"),
    ("lora_transformer_", "unet"), ("lycoris_", "unet"),
    # A1111 1.10's own SD3 layer names (`network_layer_name` of SD3Cond's modules), which its built-in Lora reads
    ("clip_l_transformer_", "te1"), ("clip_g_transformer_", "te2"), ("t5xxl_transformer_", "te3"),
)
# Dotted prefixes (diffusers, PEFT, ComfyUI).
_DOTTED_PREFIXES = (
    ("text_encoder_3.", "te3"), ("text_encoder_2.", "te2"), ("text_encoder.", "te1"), ("unet.", "unet"),
    ("transformer.", "unet"), ("model.diffusion_model.", "unet"), ("diffusion_model.", "unet"),
    ("text_encoders.clip_l.transformer.", "te1"), ("text_encoders.clip_g.transformer.", "te2"),
    ("text_encoders.t5xxl.transformer.", "te3"), ("text_encoders.clip_l.", "te1"),
    ("text_encoders.clip_g.", "te2"), ("text_encoders.t5xxl.", "te3"),
    ("base_model.model.", None),   # PEFT: the component is told by what follows
)
# Old diffusers attention processors: `<attn>.processor.to_q_lora.down.weight`.
_ATTN_PROC = re.compile(r"^(?P<attn>.*)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<ud>down|up)\.weight$")
# XLabs Flux LoRAs: processors on the BFL blocks (research families_lowbit_export.md, "Flux LoRA key styles").
_XLABS = re.compile(r"^(?P<pre>(?:.*\.)?)(?P<kind>double|single)_blocks\.(?P<n>\d+)\.processor\."
                    r"(?P<proj>qkv|proj)_lora(?P<stream>[12]?)\.(?P<ud>down|up)\.weight$")
# T5 module paths (HF T5EncoderModel): always the third text encoder.
_T5_PATH = re.compile(r"^(?:encoder\.block\.|encoder\.final_layer_norm|shared\b)")


def is_t5_path(path: str) -> bool:
    """Whether a module or parameter path (no component prefix) is HF T5EncoderModel's (`shared`,
    `encoder.block.N.…`, `encoder.final_layer_norm`): the model map and key parser agree on T5 through it."""
    return _T5_PATH.match(path) is not None

# Keys that belong to no module and are reported as such (bundled textual-inversion embeddings).
_BUNDLE = "bundle_emb."


@dataclass(frozen=True)
class KeyParts:
    component: str   # 'unet' | 'te1' | 'te2' | 'te3'
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
    if is_t5_path(path):
        return "te3"
    if path.startswith(("text_model.", "encoder.layers.", "transformer.resblocks.")):
        return "te1"
    return "unet"


def _xlabs(m: "re.Match") -> str:
    """An XLabs processor key in BFL names: qkv_lora1 -> img_attn.qkv, proj_lora2 -> txt_attn.proj; single
    blocks: qkv -> the q/k/v rows of linear1 (`linear1_qkv`), proj -> linear2."""
    if m["kind"] == "double":
        module = f"double_blocks.{m['n']}.{'txt' if m['stream'] == '2' else 'img'}_attn.{m['proj']}"
    else:
        module = f"single_blocks.{m['n']}.{'linear1_qkv' if m['proj'] == 'qkv' else 'linear2'}"
    return f"{m['pre']}{module}.lora_{m['ud']}.weight"


def parse_key(key: str) -> Optional[KeyParts]:
    """Split one file key; None when it is no module tensor we know (the caller reports it)."""
    if key.startswith(_BUNDLE):
        return None
    m = _XLABS.match(key)
    if m:
        key = _xlabs(m)
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
                body = module[len(prefix):]
                if comp in ("te1", "te2") and body.startswith("encoder_block_"):
                    comp = "te3"   # a T5 body under another prefix
                return KeyParts(comp, body, suffix, body)
        return None
    for prefix, comp in _DOTTED_PREFIXES:
        if module.startswith(prefix):
            path = module[len(prefix):]
            if comp is None:
                comp = _guess_component(path)
            if path.startswith("base_model.model."):
                path = path[len("base_model.model."):]
            if comp in ("te1", "te2") and is_t5_path(path):
                comp = "te3"
            return KeyParts(comp, path.replace(".", "_"), suffix, path) if path else None
    # A dotted key with no known prefix (e.g. a bare PEFT state dict of one sub-model, an XLabs file).
    return KeyParts(_guess_component(module), module.replace(".", "_"), suffix, module)
