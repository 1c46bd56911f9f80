"""Transformer denoisers (SD3/SD3.5 MMDiT, Flux.1): the original module names <-> the diffusers ones.

Hosts load the original single-file layouts (A1111 1.10: SAI `joint_blocks`; Forge: BFL `double_blocks`/
`single_blocks`), whose attention projections are fused: one `qkv` weight, and Flux's `linear1` holds q, k, v
and the MLP input. Diffusers, PEFT, ai-toolkit, SimpleTuner and OneTrainer name the split modules (`to_q`,
`to_k`, `to_v`, `proj_mlp`). One `Rule` per module pair says which rows of the original weight each
diffusers module is (research families_lowbit_export.md, "Flux LoRA key styles"; diffusers
`convert_sd3_transformer_checkpoint_to_diffusers` / `convert_flux_transformer_checkpoint_to_diffusers`):

    qkv        q rows [0, h), k [h, 2h), v [2h, 3h)             h = rows / 3
    linear1    q [0, h), k [h, 2h), v [2h, 3h), MLP in [3h, rows)  h = the block width (in features)
    swap       the two halves of an adaLN weight in the other order (diffusers `norm_out`, and SD3's last
               `norm1_context`, put scale before shift)

`expand()` turns the rules into `Entry`s for the modules one model has, in either layout; `ModelMap` indexes
them. Everything here is pure: names and shapes in, entries out.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional

FAMILIES = ("sd3", "flux")


@dataclass(frozen=True)
class Rule:
    native: str                 # original module path, '{n}' = block index
    diffusers: tuple            # diffusers module path(s); several = row parts of the native weight, in order
    kind: str = "same"          # 'same' | 'qkv' | 'linear1' | 'swap'
    last_only: Optional[bool] = None   # SD3 context block: True = only the last block (pre-only), False = all others


_SD3: tuple = (
    Rule("x_embedder.proj", ("pos_embed.proj",)),
    Rule("context_embedder", ("context_embedder",)),
    Rule("t_embedder.mlp.0", ("time_text_embed.timestep_embedder.linear_1",)),
    Rule("t_embedder.mlp.2", ("time_text_embed.timestep_embedder.linear_2",)),
    Rule("y_embedder.mlp.0", ("time_text_embed.text_embedder.linear_1",)),
    Rule("y_embedder.mlp.2", ("time_text_embed.text_embedder.linear_2",)),
    Rule("final_layer.linear", ("proj_out",)),
    Rule("final_layer.adaLN_modulation.1", ("norm_out.linear",), "swap"),
    Rule("joint_blocks.{n}.x_block.attn.qkv", tuple(f"transformer_blocks.{{n}}.attn.to_{p}" for p in "qkv"), "qkv"),
    Rule("joint_blocks.{n}.x_block.attn.proj", ("transformer_blocks.{n}.attn.to_out.0",)),
    Rule("joint_blocks.{n}.x_block.attn.ln_q", ("transformer_blocks.{n}.attn.norm_q",)),
    Rule("joint_blocks.{n}.x_block.attn.ln_k", ("transformer_blocks.{n}.attn.norm_k",)),
    Rule("joint_blocks.{n}.x_block.attn2.qkv", tuple(f"transformer_blocks.{{n}}.attn2.to_{p}" for p in "qkv"), "qkv"),
    Rule("joint_blocks.{n}.x_block.attn2.proj", ("transformer_blocks.{n}.attn2.to_out.0",)),
    Rule("joint_blocks.{n}.x_block.attn2.ln_q", ("transformer_blocks.{n}.attn2.norm_q",)),
    Rule("joint_blocks.{n}.x_block.attn2.ln_k", ("transformer_blocks.{n}.attn2.norm_k",)),
    Rule("joint_blocks.{n}.x_block.mlp.fc1", ("transformer_blocks.{n}.ff.net.0.proj",)),
    Rule("joint_blocks.{n}.x_block.mlp.fc2", ("transformer_blocks.{n}.ff.net.2",)),
    Rule("joint_blocks.{n}.x_block.adaLN_modulation.1", ("transformer_blocks.{n}.norm1.linear",)),
    Rule("joint_blocks.{n}.context_block.attn.qkv",
         tuple(f"transformer_blocks.{{n}}.attn.add_{p}_proj" for p in "qkv"), "qkv"),
    Rule("joint_blocks.{n}.context_block.attn.proj", ("transformer_blocks.{n}.attn.to_add_out",)),
    Rule("joint_blocks.{n}.context_block.attn.ln_q", ("transformer_blocks.{n}.attn.norm_added_q",)),
    Rule("joint_blocks.{n}.context_block.attn.ln_k", ("transformer_blocks.{n}.attn.norm_added_k",)),
    Rule("joint_blocks.{n}.context_block.mlp.fc1", ("transformer_blocks.{n}.ff_context.net.0.proj",)),
    Rule("joint_blocks.{n}.context_block.mlp.fc2", ("transformer_blocks.{n}.ff_context.net.2",)),
    Rule("joint_blocks.{n}.context_block.adaLN_modulation.1", ("transformer_blocks.{n}.norm1_context.linear",),
         last_only=False),
    Rule("joint_blocks.{n}.context_block.adaLN_modulation.1", ("transformer_blocks.{n}.norm1_context.linear",),
         "swap", last_only=True),
)

_FLUX: tuple = (
    Rule("img_in", ("x_embedder",)),
    Rule("txt_in", ("context_embedder",)),
    Rule("time_in.in_layer", ("time_text_embed.timestep_embedder.linear_1",)),
    Rule("time_in.out_layer", ("time_text_embed.timestep_embedder.linear_2",)),
    Rule("vector_in.in_layer", ("time_text_embed.text_embedder.linear_1",)),
    Rule("vector_in.out_layer", ("time_text_embed.text_embedder.linear_2",)),
    Rule("guidance_in.in_layer", ("time_text_embed.guidance_embedder.linear_1",)),
    Rule("guidance_in.out_layer", ("time_text_embed.guidance_embedder.linear_2",)),
    Rule("final_layer.linear", ("proj_out",)),
    Rule("final_layer.adaLN_modulation.1", ("norm_out.linear",), "swap"),
    Rule("double_blocks.{n}.img_attn.qkv", tuple(f"transformer_blocks.{{n}}.attn.to_{p}" for p in "qkv"), "qkv"),
    Rule("double_blocks.{n}.txt_attn.qkv",
         tuple(f"transformer_blocks.{{n}}.attn.add_{p}_proj" for p in "qkv"), "qkv"),
    Rule("double_blocks.{n}.img_attn.proj", ("transformer_blocks.{n}.attn.to_out.0",)),
    Rule("double_blocks.{n}.txt_attn.proj", ("transformer_blocks.{n}.attn.to_add_out",)),
    Rule("double_blocks.{n}.img_mlp.0", ("transformer_blocks.{n}.ff.net.0.proj",)),
    Rule("double_blocks.{n}.img_mlp.2", ("transformer_blocks.{n}.ff.net.2",)),
    Rule("double_blocks.{n}.txt_mlp.0", ("transformer_blocks.{n}.ff_context.net.0.proj",)),
    Rule("double_blocks.{n}.txt_mlp.2", ("transformer_blocks.{n}.ff_context.net.2",)),
    Rule("double_blocks.{n}.img_mod.lin", ("transformer_blocks.{n}.norm1.linear",)),
    Rule("double_blocks.{n}.txt_mod.lin", ("transformer_blocks.{n}.norm1_context.linear",)),
    Rule("single_blocks.{n}.linear1",
         tuple(f"single_transformer_blocks.{{n}}.attn.to_{p}" for p in "qkv")
         + ("single_transformer_blocks.{n}.proj_mlp",), "linear1"),
    Rule("single_blocks.{n}.linear2", ("single_transformer_blocks.{n}.proj_out",)),
    Rule("single_blocks.{n}.modulation.lin", ("single_transformer_blocks.{n}.norm.linear",)),
)

RULES: dict = {"sd3": _SD3, "flux": _FLUX}

# Module paths that tell a family in either layout (first match wins: Flux's diffusers layout also has
# `transformer_blocks`).
_FAMILY_MARKERS = (
    (re.compile(r"^(double_blocks|single_blocks|single_transformer_blocks)\."), "flux"),
    (re.compile(r"^joint_blocks\."), "sd3"),
    (re.compile(r"^transformer_blocks\.\d+\.attn\.add_q_proj"), "sd3"),
)
_NATIVE_MARK = re.compile(r"^(joint_blocks|double_blocks|single_blocks)\.")


def family_of(modules: Iterable[str]) -> Optional[str]:
    """'sd3' | 'flux' | None from the module paths of a denoiser (either layout)."""
    found = None
    for m in modules:
        for pattern, fam in _FAMILY_MARKERS:
            if pattern.match(m):
                if fam == "flux":
                    return "flux"
                found = fam
    return found


def is_native(modules: Iterable[str]) -> bool:
    """True for the original single-file layout (SAI / BFL names), False for diffusers names."""
    return any(_NATIVE_MARK.match(m) for m in modules)


@functools.lru_cache(maxsize=None)   # a few dozen templates, matched against every module of a model
def _pattern(template: str) -> "re.Pattern":
    return re.compile("^" + re.escape(template).replace(r"\{n\}", r"(\d+)") + "$")


def _fill(template: str, n: Optional[str]) -> str:
    return template.replace("{n}", n) if n is not None else template


@dataclass(frozen=True)
class Entry:
    """One module of the model and the names files use for it.

    module: the model's own module path; native: its original-layout path (block lookup, kohya names);
    aliases: other paths naming the whole weight; perm: `swap` (an alias's rows are the weight's halves in
    the other order); parts: (path, (start, stop)) names of row slices of this weight (native layout: the
    split diffusers modules); of: in a diffusers-layout model, (native path, (start, stop)) = this weight is
    those rows of a fused native weight, so a file module on the fused name is split onto it.
    """

    module: str
    native: str
    aliases: tuple = ()
    swap_aliases: tuple = ()
    parts: tuple = ()
    of: Optional[tuple] = None


def _row_parts(kind: str, rows: int, width: int) -> list:
    """(start, stop) of each part of a fused weight with `rows` rows and `width` input features."""
    if kind == "qkv":
        h = rows // 3
        return [(i * h, (i + 1) * h) for i in range(3)]
    h = width   # linear1: the block width
    return [(0, h), (h, 2 * h), (2 * h, 3 * h), (3 * h, rows)]


def block_counts(modules: Iterable[str], native: Optional[bool]) -> tuple:
    """(double-stream / SD3 joint blocks, Flux single-stream blocks) of a denoiser's module paths: dotted, or
    kohya bodies (`joint_blocks_5_…`); native: original SAI/BFL names, False: diffusers', None: either."""
    modules = list(modules)
    double = {True: "joint_blocks|double_blocks", False: "transformer_blocks", None: "joint_blocks|double_blocks|"
              "transformer_blocks"}[native]
    single = {True: "single_blocks", False: "single_transformer_blocks", None: "single_blocks|"
              "single_transformer_blocks"}[native]

    def count(key: str) -> int:
        found = [int(m[1]) for m in (re.match(rf"^(?:{key})[._](\d+)[._]", p) for p in modules) if m]
        return max(found) + 1 if found else 0
    return count(double), count(single)


def expand(family: str, shapes: Mapping[str, tuple]) -> list:
    """Entries for the denoiser modules in `shapes` (module path -> weight shape) of `family`.

    Modules no rule names get an entry with their own path only (kohya names of any module still bind).
    """
    rules = RULES[family]
    native = is_native(shapes)
    depth = block_counts(shapes, native)[0] if family == "sd3" else 0
    out = []
    for module, shape in shapes.items():
        rule, n, index = _match(rules, module, native, depth)
        if rule is None:
            out.append(Entry(module=module, native=module))
            continue
        if native:
            names = tuple(_fill(d, n) for d in rule.diffusers)
            if rule.kind in ("qkv", "linear1"):
                spans = _row_parts(rule.kind, shape[0], shape[1] if len(shape) > 1 else 0)
                parts = tuple(zip(names, spans))
                if rule.kind == "linear1":   # XLabs / ComfyUI `linear1_qkv`: the q, k, v rows together
                    parts += ((module + "_qkv", (0, spans[2][1])),)
                out.append(Entry(module=module, native=module, parts=parts))
            elif rule.kind == "swap":
                out.append(Entry(module=module, native=module, swap_aliases=names))
            else:
                out.append(Entry(module=module, native=module, aliases=names))
            continue
        native_path = _fill(rule.native, n)
        if rule.kind == "swap":
            out.append(Entry(module=module, native=native_path, swap_aliases=(native_path,)))
        elif rule.kind in ("qkv", "linear1"):
            out.append(Entry(module=module, native=native_path, of=(native_path, index, rule.kind)))
        else:
            out.append(Entry(module=module, native=native_path, aliases=(native_path,)))
    return out


def _match(rules: tuple, module: str, native: bool, depth: int) -> tuple:
    """(rule, block index or None, part index) of a module path, or (None, None, None)."""
    for rule in rules:
        templates = (rule.native,) if native else rule.diffusers
        for index, t in enumerate(templates):
            m = _pattern(t).match(module)
            if not m:
                continue
            n = m.group(1) if m.groups() else None
            if rule.last_only is not None and n is not None:
                if (int(n) == depth - 1) != rule.last_only:
                    continue
            return rule, n, index
    return None, None, None
