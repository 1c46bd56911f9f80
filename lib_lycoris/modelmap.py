"""Model layouts -> weight targets, and the names network files use for them.

A `ModelMap` lists every weight a network may patch in one model, as `Target`s, and answers
`lookup(component, body)` for the bodies `keys.parse_key` produces. It works on the two layouts
hosts load (research syntax_features.md §3.3, lycoris_formats.md §1):

- original single file (A1111, Forge): UNet `model.diffusion_model.*` in LDM/SGM names; text
  encoders `cond_stage_model.transformer.text_model.*` (SD1, HF CLIP), `cond_stage_model.model.*`
  (SD2, OpenCLIP), `conditioner.embedders.0.transformer.*` + `conditioner.embedders.1.model.*` (SDXL);
- diffusers pipelines: `unet.*`, `text_encoder.*`, `text_encoder_2.*`;

- SD3 (A1111 1.10): `model.diffusion_model.joint_blocks.*` (SAI MMDiT), text encoders
  `text_encoders.{clip_l,clip_g,t5xxl}.transformer.*`; diffusers `transformer.*`, `text_encoder_3.*`;
- Flux.1: BFL `double_blocks.*`/`single_blocks.*` bare or under `model.diffusion_model.`, `text_encoders.
  {clip_l,t5xxl}.`; diffusers `transformer.*` (T5 as `text_encoder_2.*`: 'te3' here, as kohya names it);

or on component roots a host hands over directly (`from_components`). Every UNet module answers to
its LDM/SGM name and to its diffusers name (the kohya SD1 files use one, the SDXL ones the other);
every text-encoder module to its HF name with and without `text_model_`; an OpenCLIP
`attn.in_proj_weight` is three targets, the q/k/v row thirds. A transformer denoiser's modules answer
to their original and diffusers names (`dit`): a split diffusers module (`to_q`) is a row slice of the
fused original weight (`qkv`), an adaLN weight whose halves diffusers orders the other way is a `swap`
target, and in a diffusers-layout model a fused original name is a group of split weights (`groups`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional

import torch

from . import dit
from .keys import is_t5_path

Tensor = torch.Tensor

# Where each component lives in a whole-model state dict / module tree (order: first match wins).
ROOTS: tuple = (
    ("model.diffusion_model.", "unet"),
    ("text_encoders.clip_l.transformer.", "te1"),
    ("text_encoders.clip_g.transformer.", "te2"),
    ("text_encoders.t5xxl.transformer.", "te3"),
    ("conditioner.embedders.0.transformer.", "te1"),
    ("conditioner.embedders.1.model.", "te2"),
    ("cond_stage_model.transformer.", "te1"),
    ("cond_stage_model.model.", "te1"),
    ("unet.", "unet"),
    ("text_encoder.", "te1"),
    ("text_encoder_2.", "te2"),
    ("text_encoder_3.", "te3"),
    ("transformer.", "unet"),
)

# Names that tell a bare UNet / text encoder (a host handing over one component as the model).
_BARE_UNET = ("conv_in.", "down_blocks.", "input_blocks.", "time_embed.", "time_embedding.", "joint_blocks.",
              "double_blocks.", "single_blocks.", "transformer_blocks.", "x_embedder.", "img_in.")
_BARE_TEXT = ("text_model.", "encoder.layers.", "transformer.resblocks.")

_RESNET_LDM_TO_DIFF = {
    "in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut",
}
_RESNET_DIFF_TO_LDM = {v: k for k, v in _RESNET_LDM_TO_DIFF.items()}

# OpenCLIP text tower -> HF CLIP names (inside one resblock / at the top).
_OPENCLIP_BLOCK = {"attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
                   "ln_1": "layer_norm1", "ln_2": "layer_norm2"}
_OPENCLIP_TOP = {"ln_final": "final_layer_norm", "token_embedding": "embeddings.token_embedding"}
_RESBLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class Target:
    """One weight (or row slice of one) a network module can patch.

    weight/bias are full parameter names in the model given; rows is (start, stop) on dim 0 when
    the target is a slice (OpenCLIP q/k/v); shape is the (sliced) weight's shape.
    """

    component: str
    module: str
    weight: str
    bias: Optional[str]
    rows: Optional[tuple]
    shape: tuple
    ldm_path: Optional[str]     # UNet: the LDM/SGM module path inside the UNet (block lookup); DiT: original path
    name: str                   # canonical kohya-style name, e.g. 'lora_unet_down_blocks_0_...'
    weight_shape: tuple = ()    # the whole parameter's shape (shape is the slice's)
    swap: bool = False          # the file's rows are the weight's two halves in the other order

    @property
    def kind(self) -> str:
        return {4: "conv", 2: "linear", 1: "norm"}.get(len(self.shape), "other")

    @property
    def label(self) -> str:
        """The weight, with its rows where the target is a slice (reports)."""
        if self.rows is not None:
            return f"{self.weight}[{self.rows[0]}:{self.rows[1]}]"
        return self.weight + (" (halves swapped)" if self.swap else "")

    def placement(self) -> Optional[tuple]:
        """(rows of the whole weight, ((dst, src, n), ...)): where the file module's ΔW rows land; None when
        the module is the whole weight as it is."""
        total = self.weight_shape[0] if self.weight_shape else self.shape[0]
        if self.rows is not None:
            return total, ((self.rows[0], 0, self.rows[1] - self.rows[0]),)
        if self.swap:
            h = total // 2
            return total, ((h, 0, h), (0, h, total - h))
        return None


# ----------------------------------------------------------------------------------------------
# UNet: LDM/SGM <-> diffusers module paths

@dataclass(frozen=True)
class UNetLayout:
    levels: int
    attention: tuple          # per down level: has cross-attention blocks
    pairs: tuple = field(default=(), compare=False)   # (ldm_prefix, diffusers_prefix, is_resnet)

    @staticmethod
    def build(levels: int, attention: tuple) -> "UNetLayout":
        p = [("input_blocks.0.0", "conv_in", False), ("time_embed.0", "time_embedding.linear_1", False),
             ("time_embed.2", "time_embedding.linear_2", False),
             ("label_emb.0.0", "add_embedding.linear_1", False),
             ("label_emb.0.2", "add_embedding.linear_2", False),
             ("out.0", "conv_norm_out", False), ("out.2", "conv_out", False),
             ("middle_block.0", "mid_block.resnets.0", True), ("middle_block.1", "mid_block.attentions.0", False),
             ("middle_block.2", "mid_block.resnets.1", True)]
        for i in range(levels):
            for j in range(2):
                n = 3 * i + j + 1
                p.append((f"input_blocks.{n}.0", f"down_blocks.{i}.resnets.{j}", True))
                if attention[i]:
                    p.append((f"input_blocks.{n}.1", f"down_blocks.{i}.attentions.{j}", False))
            if i < levels - 1:
                p.append((f"input_blocks.{3 * i + 3}.0.op", f"down_blocks.{i}.downsamplers.0.conv", False))
            up_attn = attention[levels - 1 - i]
            for j in range(3):
                n = 3 * i + j
                p.append((f"output_blocks.{n}.0", f"up_blocks.{i}.resnets.{j}", True))
                if up_attn:
                    p.append((f"output_blocks.{n}.1", f"up_blocks.{i}.attentions.{j}", False))
            if i < levels - 1:
                p.append((f"output_blocks.{3 * i + 2}.{2 if up_attn else 1}.conv",
                          f"up_blocks.{i}.upsamplers.0.conv", False))
        return UNetLayout(levels, tuple(attention), tuple(p))

    @staticmethod
    def from_paths(paths: Iterable[str]) -> Optional["UNetLayout"]:
        """Infer levels and attention from module paths of either layout."""
        paths = list(paths)
        ldm = [int(m[1]) for m in (re.match(r"input_blocks\.(\d+)\.", p + ".") for p in paths) if m]
        if ldm:
            levels = (max(ldm) + 1) // 3
            attn = tuple(any(p.startswith(f"input_blocks.{3 * i + 1}.1.") for p in paths) for i in range(levels))
            return UNetLayout.build(levels, attn)
        diff = [int(m[1]) for m in (re.match(r"down_blocks\.(\d+)\.", p) for p in paths) if m]
        if diff:
            levels = max(diff) + 1
            attn = tuple(any(p.startswith(f"down_blocks.{i}.attentions.") for p in paths) for i in range(levels))
            return UNetLayout.build(levels, attn)
        return None

    def _convert(self, path: str, to_diffusers: bool) -> Optional[str]:
        for ldm, diff, resnet in self.pairs:
            src, dst = (ldm, diff) if to_diffusers else (diff, ldm)
            if path == src or path.startswith(src + "."):
                rest = path[len(src) + 1:]
                if resnet and rest:
                    table = _RESNET_LDM_TO_DIFF if to_diffusers else _RESNET_DIFF_TO_LDM
                    for a, b in table.items():
                        if rest == a or rest.startswith(a + "."):
                            rest = b + rest[len(a):]
                            break
                return dst + ("." + rest if rest else "")
        return None

    def to_diffusers(self, ldm_path: str) -> Optional[str]:
        return self._convert(ldm_path, True)

    def to_ldm(self, diffusers_path: str) -> Optional[str]:
        return self._convert(diffusers_path, False)


# ----------------------------------------------------------------------------------------------

def _underscore(path: str) -> str:
    return path.replace(".", "_")


_PREFIX_OF = {"unet": "lora_unet_", "te1": "lora_te1_", "te2": "lora_te2_", "te3": "lora_te3_"}


class ModelMap:
    """Every patchable weight of one model and the aliases network files use for it."""

    def __init__(self, shapes: Mapping[str, tuple], roots: Mapping[str, str]) -> None:
        """Args: shapes: full parameter name -> shape; roots: component -> name prefix ('' allowed)."""
        self.roots = dict(roots)
        self.targets: list = []
        self._alias: dict = {}
        self._groups: dict = {}     # (component, body) -> ((Target, (start, stop) rows of the file module), ...)
        self.styles: dict = {}
        self.unet_layout: Optional[UNetLayout] = None
        self.family: Optional[str] = None   # 'sd3' | 'flux' for a transformer denoiser
        self.depth: int = 0                 # its number of double-stream (SD3 joint) blocks
        self.singles: int = 0               # Flux: its number of single-stream blocks
        by_comp: dict = {c: {} for c in roots}
        for name, shape in shapes.items():
            for comp, prefix in roots.items():
                if name.startswith(prefix):
                    by_comp[comp][name[len(prefix):]] = tuple(shape)
                    break
        for comp, params in by_comp.items():
            if comp == "unet":
                self._index_unet(roots[comp], params)
            else:
                self._index_text(comp, roots[comp], params)
        self.arch = self._detect_arch(by_comp)

    # --- construction -----------------------------------------------------------------------
    @classmethod
    def from_state_dict(cls, sd: Mapping[str, object]) -> "ModelMap":
        """From a whole-model state dict (or name -> shape mapping) of either layout."""
        shapes = {k: tuple(v.shape) if hasattr(v, "shape") else tuple(v) for k, v in sd.items()}
        roots = {}
        for prefix, comp in ROOTS:
            if comp not in roots and prefix not in roots.values() and any(k.startswith(prefix) for k in shapes):
                if comp == "te2" and "te3" not in roots and \
                        any(k.startswith(prefix) and is_t5_path(k[len(prefix):]) for k in shapes):
                    comp = "te3"   # diffusers' Flux pipeline: text_encoder_2 is T5
                roots[comp] = prefix
        if not roots:   # a bare component: a UNet/transformer or a text encoder on its own
            if any(k.startswith(_BARE_UNET) for k in shapes):
                roots["unet"] = ""
            elif any(is_t5_path(k) for k in shapes):
                roots["te3"] = ""
            elif any(k.startswith(_BARE_TEXT) for k in shapes):
                roots["te1"] = ""
        return cls(shapes, roots)

    @classmethod
    def from_module(cls, root: torch.nn.Module) -> "ModelMap":
        return cls.from_state_dict({n: tuple(p.shape) for n, p in root.named_parameters()})

    @classmethod
    def from_components(cls, components: Mapping[str, torch.nn.Module]) -> "ModelMap":
        """From component roots, e.g. {'unet': sd_model.model.diffusion_model, 'te1': clip_l, 'te2': clip_g}.

        Parameter names are then '<component>.<name inside it>'.
        """
        shapes = {f"{c}.{n}": tuple(p.shape) for c, m in components.items() for n, p in m.named_parameters()}
        return cls(shapes, {c: f"{c}." for c in components})

    def _add(self, comp: str, prefix: str, module: str, params: Mapping[str, tuple], aliases: Iterable[str],
             ldm_path: Optional[str], canonical: str, weight_param: str = "weight",
             bias_param: str = "bias", rows: Optional[tuple] = None, swap: bool = False,
             primary: bool = True) -> Target:
        full = tuple(params[f"{module}.{weight_param}" if module else weight_param])
        shape = full if rows is None else (rows[1] - rows[0],) + full[1:]
        bias_name = f"{module}.{bias_param}" if module else bias_param
        t = Target(component=comp, module=prefix + module,
                   weight=prefix + (f"{module}.{weight_param}" if module else weight_param),
                   bias=prefix + bias_name if bias_name in params else None, rows=rows, shape=tuple(shape),
                   ldm_path=ldm_path, name=_PREFIX_OF[comp] + _underscore(canonical), weight_shape=full,
                   swap=swap)
        if primary:   # `targets` lists each weight once (a slice or swapped view of a listed weight is not)
            self.targets.append(t)
        for a in aliases:
            self._alias.setdefault((comp, _underscore(a)), t)
        return t

    def _index_unet(self, prefix: str, params: Mapping[str, tuple]) -> None:
        modules = [n[: -len(".weight")] for n in params if n.endswith(".weight")]
        family = dit.family_of(modules)
        if family is not None:
            self._index_dit(family, prefix, params, modules)
            return
        layout = UNetLayout.from_paths(modules)
        self.unet_layout = layout
        ldm_style = any(m.startswith("input_blocks.") for m in modules)
        self.styles["unet"] = "ldm" if ldm_style else "diffusers"
        for m in modules:
            if layout is None:
                ldm, diff = (m, None) if ldm_style else (None, m)
            elif ldm_style:
                ldm, diff = m, layout.to_diffusers(m)
            else:
                ldm, diff = layout.to_ldm(m), m
            aliases = [a for a in (m, ldm, diff) if a]
            self._add("unet", prefix, m, params, aliases, ldm, diff or m)

    def _index_dit(self, family: str, prefix: str, params: Mapping[str, tuple], modules: list) -> None:
        """A transformer denoiser in either layout (see `dit`)."""
        self.family = family
        native = dit.is_native(modules)
        self.styles["unet"] = "native" if native else "diffusers"
        self.depth, self.singles = dit.block_counts(modules, native)
        fused: dict = {}   # diffusers layout: native fused path -> [(part index, Target)]
        for e in dit.expand(family, {m: params[m + ".weight"] for m in modules}):
            self._add("unet", prefix, e.module, params, (e.module, *e.aliases), e.native, e.native)
            for a in e.swap_aliases:
                self._add("unet", prefix, e.module, params, (a,), e.native, e.native, swap=True, primary=False)
            for name, rows in e.parts:
                self._add("unet", prefix, e.module, params, (name,), e.native, name, rows=rows, primary=False)
            if e.of is not None:
                native_path, index, kind = e.of
                t = self._alias[("unet", _underscore(e.module))]
                fused.setdefault(native_path, []).append((index, t))
                if kind == "linear1" and index < 3:
                    fused.setdefault(native_path + "_qkv", []).append((index, t))
        for native_path, parts in fused.items():
            start, group = 0, []
            for _, t in sorted(parts, key=lambda p: p[0]):
                group.append((t, (start, start + t.shape[0])))
                start += t.shape[0]
            self._groups[("unet", _underscore(native_path))] = tuple(group)

    def _index_text(self, comp: str, prefix: str, params: Mapping[str, tuple]) -> None:
        openclip = any(n.startswith("transformer.resblocks.") for n in params)
        self.styles[comp] = "openclip" if openclip else "hf"
        for name in params:
            if openclip and name.endswith(".in_proj_weight"):
                module = name[: -len(".in_proj_weight")]
                m = _RESBLOCK.match(module)
                if not m:
                    continue
                dim = params[name][0] // 3
                for i, proj in enumerate("qkv"):
                    hf = f"encoder.layers.{m[1]}.self_attn.{proj}_proj"
                    self._add(comp, prefix, module, params, (hf, "text_model." + hf), None, "text_model." + hf,
                              weight_param="in_proj_weight", bias_param="in_proj_bias",
                              rows=(i * dim, (i + 1) * dim))
                continue
            if not name.endswith(".weight"):
                continue
            module = name[: -len(".weight")]
            if is_t5_path(module):   # T5: HF names as they are
                self._add(comp, prefix, module, params, (module,), None, module)
                continue
            if openclip:
                hf = self._openclip_to_hf(module)
                aliases = [module] + ([hf, "text_model." + hf] if hf else [])
                canonical = "text_model." + hf if hf else module
            else:
                inner = module[len("text_model."):] if module.startswith("text_model.") else module
                aliases = [inner, "text_model." + inner]
                canonical = "text_model." + inner
            self._add(comp, prefix, module, params, aliases, None, canonical)

    @staticmethod
    def _openclip_to_hf(module: str) -> Optional[str]:
        m = _RESBLOCK.match(module)
        if m:
            hf = _OPENCLIP_BLOCK.get(m[2])
            return f"encoder.layers.{m[1]}.{hf}" if hf else None
        return _OPENCLIP_TOP.get(module)

    def _detect_arch(self, by_comp: Mapping[str, Mapping[str, tuple]]) -> str:
        if self.family is not None:
            return self.family
        if "te3" in by_comp:   # text encoders alone: T5 comes with SD3 (beside CLIP-G) or Flux
            return "sd3" if "te2" in by_comp else "flux"
        layout = self.unet_layout
        if layout is not None:
            if layout.levels == 3:
                return "sdxl"
            if layout.levels == 4:
                unet = by_comp.get("unet", {})
                proj = [s for n, s in unet.items() if n.endswith("proj_in.weight")]
                return "sd2" if proj and len(proj[0]) == 2 else "sd1"
            return "unknown"
        if "te2" in by_comp:
            return "sdxl"
        if "te1" in by_comp:
            return "sd2" if self.styles.get("te1") == "openclip" else "sd1"
        return "unknown"

    # --- queries ------------------------------------------------------------------------------
    def lookup(self, component: str, body: str) -> Optional[Target]:
        """The target a file module (component, underscore body) names, or None."""
        return self._alias.get((component, body))   # text encoders are indexed with and without `text_model_`

    def lookup_group(self, component: str, body: str) -> Optional[tuple]:
        """In a diffusers-layout transformer: the split weights a fused original name covers, as
        ((Target, (start, stop) rows of the file module), ...); None elsewhere."""
        return self._groups.get((component, body))

    @property
    def components(self) -> tuple:
        return tuple(self.roots)
