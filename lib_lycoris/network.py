"""A parsed network file: per-module adapters, the base model it was made for, and what it fits.

    net = load_network(path)               # read, group keys per module, detect each module's type
    binding = bind(net, ModelMap.from_module(model))   # match modules to model weights, check shapes
    binding.report                          # matched / unmatched / skipped with reasons

Nothing is skipped silently: file keys no module claims, modules the model lacks and modules whose
shape does not fit are all listed in the report.
"""
from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import torch

from . import algorithms
from .algorithms import Adapter
from .algorithms.lora import LoRA
from .compose import Contribution
from .errors import FormatError, LycorisError, ModelMismatchError, NetworkFileError, NonFiniteError
from .files import PathLike, RawFile, read_file
from .keys import parse_key
from .modelmap import ModelMap, Target

log = logging.getLogger("lycoris")

ARCHES = ("sd1", "sd2", "sdxl", "sd3", "flux")
# Cross-attention context width (input of attn2.to_k) and text-encoder width per architecture.
_CONTEXT_DIM = {768: "sd1", 1024: "sd2", 2048: "sdxl", 1280: "sdxl"}
_PEFT_CONFIG_PREFIX = {"unet": "unet", "te1": "text_encoder", "te2": "text_encoder_2", "te3": "text_encoder_3"}
# diffusers' lora_adapter_metadata names a transformer denoiser `transformer`.
_PEFT_DENOISER_PREFIXES = ("unet", "transformer")
# Transformer blocks in module bodies (any key style): the family they belong to.
_DIT_BODY = (
    (re.compile(r"(^|_)(double_blocks|single_blocks|single_transformer_blocks)_\d+_"), "flux"),
    (re.compile(r"(^|_)joint_blocks_\d+_"), "sd3"),
)
# Width of a transformer block (input of its attention projections): Flux 3072; SD3 64 × depth (24, 38).
_DIT_WIDTH = {3072: "flux", 1536: "sd3", 2432: "sd3"}
# PEFT pattern keys used as regular expressions: at most this many quantifiers and no quantified group, so that
# matching one module path stays a low-degree polynomial (measured: '.*' x4 on a 34-character path 0.3 ms, x5
# 18 ms, each one more ~60x).
_MAX_PATTERN_QUANTIFIERS = 3
_QUANTIFIER = re.compile(r"(?<![\\(])[*+?]|(?<!\\)\{\d*,?\d*\}")
_QUANTIFIED_GROUP = re.compile(r"\)[*+{]")
# Tensors read as one number (alpha/rank, a stored LoRA scale, IA3's side flag); checked before any adapter
# reads them (an empty one was an IndexError, found by tests/test_fuzz.py).
_SCALAR_SUFFIXES = ("alpha", "scale", "on_input")
# Float dtypes torch.isfinite takes (not the float8 ones).
_ISFINITE_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class NetworkModule:
    """One module of a network file."""

    component: str            # 'unet' | 'te1' | 'te2'
    body: str                 # module path with '_' (see keys)
    path: str                 # the module path as the file spells it (dots kept for PEFT names)
    adapter: Adapter
    scale: float              # alpha/rank as this file defines it
    dora_scale: Optional[torch.Tensor]
    bias_delta: Optional[torch.Tensor]
    keys: tuple               # the file keys it was built from

    @property
    def algo(self) -> str:
        return self.adapter.algo + ("+dora" if self.dora_scale is not None else "")

    def contribution(self, dyn: Optional[int] = None, place: Optional[tuple] = None) -> Contribution:
        """The merge-rule input for one target; place: `Target.placement()` (rows of the whole weight)."""
        adapter = self.adapter.sliced(dyn) if isinstance(self.adapter, LoRA) else self.adapter
        return Contribution(adapter=adapter, scale=self.scale, dora_scale=self.dora_scale,
                            bias_delta=self.bias_delta if self.bias_delta is not None else adapter.bias_delta(),
                            place=place)

    def rows(self, start: int, stop: int) -> Optional["NetworkModule"]:
        """This module restricted to ΔW rows [start, stop) (a fused weight split apart), or None where the
        type cannot be restricted exactly (`Adapter.rows`) or DoRA normalises across rows (input axis)."""
        adapter = self.adapter.rows(start, stop)
        if adapter is None:
            return None
        dora = self.dora_scale
        if dora is not None:
            if dora.shape[0] != self.adapter.out_features():
                return None
            dora = dora[start:stop]
        bias = self.bias_delta[start:stop] if self.bias_delta is not None else None
        return replace(self, adapter=adapter, dora_scale=dora, bias_delta=bias)


@dataclass
class Network:
    path: Path
    name: str
    metadata: dict
    modules: dict                   # (component, body) -> NetworkModule
    unknown_keys: list              # keys no module claims (reported, never applied)
    base_model: str                 # 'sd1' | 'sd2' | 'sdxl' | 'unknown'
    base_model_reason: str
    size: int = 0
    mtime: float = 0.0

    @property
    def algos(self) -> Counter:
        return Counter(m.algo for m in self.modules.values())

    def nbytes(self) -> int:
        return sum(m.adapter.nbytes() for m in self.modules.values())


# --------------------------------------------------------------------------------------------------

def _peft_config(metadata: dict) -> dict:
    """component -> PEFT config dict, from diffusers' `lora_adapter_metadata` (keys prefixed `unet.`,
    `text_encoder.`, ...) or PEFT's own `peft_config` (one config for every component)."""
    name = "lora_adapter_metadata" if "lora_adapter_metadata" in metadata else "peft_config"
    raw = metadata.get(name)
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError):   # not JSON, too-long numbers, too deep
        log.warning("%s is not JSON; PEFT modules get scale 1", name)
        return {}
    if not isinstance(meta, dict):
        return {}
    out: dict = {}
    for comp, prefix in _PEFT_CONFIG_PREFIX.items():
        for pre in _PEFT_DENOISER_PREFIXES if comp == "unet" else (prefix,):
            sub = {k[len(pre) + 1:]: v for k, v in meta.items() if k.startswith(pre + ".")}
            if sub:
                out[comp] = sub
    if not out and ("lora_alpha" in meta or "alpha" in meta):
        out = {c: meta for c in _PEFT_CONFIG_PREFIX}
    return out


def _pattern_value(patterns: dict, path: str, default):
    """PEFT rank_pattern / alpha_pattern: a key matches a module name ending in it, as a name or (as PEFT
    reads it) a regular expression. A file's expression is refused where it could backtrack for hours on a
    module path (nested or many quantifiers: `(a*)*b`, `.*.*.*…x`; found by tests/test_fuzz.py)."""
    if not isinstance(patterns, dict):
        if patterns:
            raise FormatError(f"PEFT config pattern {_brief(patterns)} is not an object")
        return default
    for pat, value in patterns.items():
        if path == pat or path.endswith("." + pat):
            return value
        if len(_QUANTIFIER.findall(pat)) > _MAX_PATTERN_QUANTIFIERS or _QUANTIFIED_GROUP.search(pat):
            raise FormatError(f"PEFT config pattern {_brief(pat)} is too complex a regular expression to match "
                              "safely")
        try:
            if re.fullmatch(rf"(?:.*\.)?(?:{pat})", path):
                return value
        except re.error as e:
            raise FormatError(f"PEFT config pattern {_brief(pat)} is not a regular expression ({e})") from e
    return default


def _brief(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _config_number(value, what: str) -> Optional[float]:
    """A rank or alpha from a PEFT config: None where absent, else a finite number (FormatError otherwise)."""
    if value is None:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    try:
        number = float(value) if ok else math.nan
    except OverflowError:
        number = math.inf
    if not math.isfinite(number) or number < 0:
        raise FormatError(f"PEFT config {what} {_brief(value)} is not a finite non-negative number")
    return number


def _peft_scale(config: dict, path: str, rank: Optional[int]) -> float:
    """alpha/r (rs-LoRA: alpha/√r) as PEFT scales: r from the tensors (or the config where the type has no
    rank, e.g. a LoKr with both factors full), alpha from `alpha_pattern` or `lora_alpha` / `alpha`."""
    r = rank or _config_number(_pattern_value(config.get("rank_pattern"), path, config.get("r")), "rank")
    alpha = _config_number(_pattern_value(config.get("alpha_pattern"), path,
                                          config.get("lora_alpha", config.get("alpha", r))), "alpha")
    if r is None or not r or alpha is None:
        return 1.0
    return alpha / (math.sqrt(r) if config.get("use_rslora") else float(r))


def _check_finite(raw: RawFile) -> None:
    for k, t in raw.tensors.items():
        if not t.is_floating_point():
            continue
        if t.dtype not in _ISFINITE_DTYPES:
            t = t.to(torch.float16)   # float8 (no isfinite in torch): every value, inf and NaN fit float16
        if not bool(torch.isfinite(t).all()):
            raise NonFiniteError("tensor holds NaN or infinity", file=str(raw.path), key=k)


# BFL's Flux control LoRAs (Canny, Depth): LoRA factors plus bias deltas on `lora_B` and norm scales that
# replace the model's (diffusers `_convert_bfl_flux_control_lora_to_diffusers`); they also widen `img_in`.
_BFL_CONTROL = re.compile(r"(^|\.)(query_norm|key_norm)\.scale$|\.lora_B\.bias$")


def _refuse_control_lora(raw: RawFile) -> None:
    key = next((k for k in raw.tensors if _BFL_CONTROL.search(k)), None)
    if key is not None:
        raise NetworkFileError(
            "a Flux control LoRA (BFL Canny/Depth): it replaces norm scales, adds bias deltas and widens img_in "
            "for a control image, which a prompt tag cannot supply; load it with the host's control workflow",
            file=str(raw.path), key=key)


def build_network(raw: RawFile, name: Optional[str] = None) -> Network:
    """Group the file's tensors per module and build each module's adapter (see module doc)."""
    _check_finite(raw)
    _refuse_control_lora(raw)
    groups: dict = {}
    paths: dict = {}
    unknown = []
    for key, t in raw.tensors.items():
        parts = parse_key(key)
        if parts is None:
            unknown.append(key)
            continue
        g = groups.setdefault(parts.module, {})
        if parts.suffix in g:
            raise FormatError(f"two keys give module {parts.body!r} the same tensor {parts.suffix!r}",
                              file=str(raw.path), key=key)
        g[parts.suffix] = (key, t)
        paths.setdefault(parts.module, parts.path)
    peft = _peft_config(raw.metadata)
    modules = {}
    for (comp, body), g in groups.items():
        tensors = {s: t for s, (_, t) in g.items()}
        keys = tuple(k for k, _ in g.values())
        where = keys[0].rsplit(".", 1)[0] if len(keys) == 1 else _common_prefix(keys)
        for s in _SCALAR_SUFFIXES:
            if s in tensors and tensors[s].numel() != 1:
                raise FormatError(f"{s} must be a scalar, has shape {tuple(tensors[s].shape)}",
                                  file=str(raw.path), key=g[s][0])
        try:
            adapter = algorithms.build(tensors, where)
        except FormatError as e:
            raise FormatError(e.message, file=str(raw.path), key=e.key, keys=e.keys) from e
        if adapter.rank() == 0:   # alpha/rank would divide by zero (found fuzzing the reader)
            raise FormatError(f"{adapter.algo} module has rank 0", file=str(raw.path), key=where, keys=keys)
        alpha = tensors.get("alpha")
        dotted = not keys[0].startswith(("lora_", "lycoris_"))   # diffusers / PEFT spelling
        if alpha is not None:
            scale = adapter.scale_for(float(alpha.float().reshape(-1)[0]))
        elif dotted and comp in peft and adapter.algo in ("lora", "loha", "lokr"):
            scale = _peft_scale(peft[comp], paths[(comp, body)], adapter.rank())   # `keys` strips base_model.model.
        else:
            scale = adapter.scale_for(None)
        dora = tensors.get("dora_scale")
        if dora is not None and "lora_magnitude_vector" in g["dora_scale"][0]:
            dora = dora.reshape(-1)   # PEFT: one magnitude per output row, (out,) or (1, out, 1, 1) on convs
        if dora is not None and not adapter.supports_dora:
            raise FormatError(f"dora_scale on a {adapter.algo} module", file=str(raw.path), key=where)
        modules[(comp, body)] = NetworkModule(
            component=comp, body=body, path=paths[(comp, body)], adapter=adapter, scale=scale,
            dora_scale=dora, bias_delta=tensors.get("diff_b") if not adapter.has_bias_delta else None,
            keys=keys)
    if not modules:
        raise NetworkFileError("no network module found among the file's keys "
                               f"(first keys: {', '.join(sorted(raw.tensors)[:5])})", file=str(raw.path))
    arch, reason = detect_base_model(raw.metadata, modules)
    return Network(path=raw.path, name=name or raw.path.stem, metadata=raw.metadata, modules=modules,
                   unknown_keys=sorted(unknown), base_model=arch, base_model_reason=reason,
                   size=raw.size, mtime=raw.mtime)


def _common_prefix(keys: tuple) -> str:
    first = keys[0]
    for i, ch in enumerate(first):
        if any(len(k) <= i or k[i] != ch for k in keys[1:]):
            return first[:i].rstrip("._")
    return first


def load_network(path: PathLike, name: Optional[str] = None) -> Network:
    """Read and parse one network file. Raises a LycorisError subclass naming the file and key."""
    raw = read_file(path)
    try:
        return build_network(raw, name)
    except LycorisError as e:
        if e.file is None:
            e.file = str(path)
            e.args = (str(e),)
        raise


# --------------------------------------------------------------------------------------------------
# Base model detection (research syntax_features.md §9)

def base_model_from_metadata(md: dict) -> Optional[tuple]:
    """('sd1'|'sd2'|'sdxl'|'sd3'|'flux', reason) from kohya / ModelSpec metadata alone, or None."""
    v = md.get("ss_base_model_version", "")
    arch = md.get("modelspec.architecture", "")
    if v.startswith("flux") or arch.startswith("flux-1"):
        return "flux", f"ss_base_model_version={v}" if v.startswith("flux") else f"modelspec.architecture={arch}"
    if v.startswith("sd3") or arch.startswith("stable-diffusion-3"):
        return "sd3", f"ss_base_model_version={v}" if v.startswith("sd3") else f"modelspec.architecture={arch}"
    if v.startswith("sdxl"):
        return "sdxl", f"ss_base_model_version={v}"
    if v.startswith("sd_v2"):
        return "sd2", f"ss_base_model_version={v}"
    if v.startswith("sd_v1"):
        return "sd1", f"ss_base_model_version={v}"
    for prefix, a in (("stable-diffusion-xl", "sdxl"), ("stable-diffusion-v2", "sd2"),
                      ("stable-diffusion-v1", "sd1")):
        if arch.startswith(prefix):
            return a, f"modelspec.architecture={arch}"
    if md.get("ss_v2") == "True":
        return "sd2", "ss_v2=True"
    return None


def flux_variant(metadata: dict, modules: dict) -> Optional[str]:
    """'dev' | 'schnell' where the file says which (ModelSpec architecture, kohya's model name), or a
    guidance-embedder module (Flux dev has one, schnell none); else None."""
    arch = metadata.get("modelspec.architecture", "") + " " + metadata.get("ss_sd_model_name", "")
    for v in ("schnell", "dev"):
        if v in arch.lower():
            return v
    if any(re.search(r"guidance_(in|embedder)", m.body) for m in modules.values() if m.component == "unet"):
        return "dev"
    return None


def base_model_of_file(path: PathLike) -> tuple:
    """('sd1'|'sd2'|'sdxl'|'sd3'|'flux'|'unknown', reason) from the safetensors header alone (metadata, key names and
    shapes; no tensor is read): for the Networks tab badge. Pickles read nothing and say 'unknown'."""
    from .files import read_header
    header = read_header(path)
    metadata = header.pop("__metadata__", {}) or {}
    found = base_model_from_metadata(metadata)
    if found:
        return found
    comps = set()
    for key, info in header.items():
        parts = parse_key(key)
        if parts is None:
            continue
        comps.add(parts.component)
        shape = info.get("shape", [])
        if parts.component == "unet" and len(shape) == 2:
            widths = (shape[1],) if parts.suffix in _IN_SUFFIXES else (shape[0],) if parts.suffix in _OUT_SUFFIXES else ()
            fam = _dit_family(parts.body, widths)
            if fam:
                return fam
        if parts.component == "unet" and re.search(r"attn2_to_[kv]$", parts.body) and len(shape) == 2 \
                and parts.suffix in ("lora_down.weight", "hada_w1_b", "diff"):
            if shape[1] in _CONTEXT_DIM:
                return _CONTEXT_DIM[shape[1]], f"cross-attention input width {shape[1]} ({parts.body})"
        if parts.component == "unet" and re.match(r"(input_blocks|output_blocks|middle_block)_", parts.body):
            return "sdxl", "UNet keys in SGM naming (kohya writes these for SDXL)"
    if "te3" in comps:
        return ("sd3", "has CLIP-G and T5 text encoders") if "te2" in comps else ("flux", "has a T5 text encoder only")
    if "te2" in comps:
        return "sdxl", "has a second text encoder (lora_te2_)"
    return "unknown", "no metadata and no telling key shape in the header"


# Suffixes whose tensor's second dimension is the module's input width.
_IN_SUFFIXES = ("lora_down.weight", "hada_w1_b", "diff")
# ... and whose first dimension is its output width.
_OUT_SUFFIXES = ("lora_up.weight", "hada_w1_a")


def _dit_family(body: str, widths: tuple = ()) -> Optional[tuple]:
    """(family, reason) of a transformer module body, from its block name, or, for diffusers' root-level
    `transformer_blocks` (SD3 and Flux share those names; UNets nest theirs in `attentions_N_`), from the
    block index or the block width among `widths` (the module's input and output features)."""
    for pattern, fam in _DIT_BODY:
        if pattern.search(body):
            return fam, f"{fam} transformer blocks ({body})"
    m = re.match(r"^transformer_blocks_(\d+)_", body)
    if m:
        if int(m[1]) >= 19:
            return "sd3", f"transformer block {m[1]} (Flux has 19 double blocks)"
        for w in widths:
            if w in _DIT_WIDTH:
                return _DIT_WIDTH[w], f"transformer width {w} ({body})"
    return None


def _input_width(adapter: Adapter) -> Optional[int]:
    """Input features of a Linear delta (numel / out), where the type tells its full shape."""
    if not adapter.additive or adapter.numel() <= 0:
        return None
    out = adapter.out_features()
    return adapter.numel() // out if out > 0 else None


def detect_base_model(metadata: dict, modules: dict) -> tuple:
    """('sd1'|'sd2'|'sdxl'|'sd3'|'flux'|'unknown', reason): metadata first, then key names and shapes."""
    by_meta = base_model_from_metadata(metadata)
    if by_meta:
        return by_meta
    comps = {m.component for m in modules.values()}
    for m in modules.values():
        if m.component == "unet":
            out = m.adapter.out_features() if m.adapter.additive else -1
            fam = _dit_family(m.body, (_input_width(m.adapter), out))
            if fam:
                return fam
    if "te3" in comps:
        return ("sd3", "has CLIP-G and T5 text encoders") if "te2" in comps else ("flux", "has a T5 text encoder only")
    if "te2" in comps:
        return "sdxl", "has a second text encoder (lora_te2_)"
    for m in modules.values():
        if m.component == "unet" and re.search(r"attn2_to_[kv]$", m.body):
            width = _input_width(m.adapter)
            if width in _CONTEXT_DIM:
                return _CONTEXT_DIM[width], f"cross-attention input width {width} ({m.body})"
    for m in modules.values():
        if m.component == "unet" and re.match(r"(input_blocks|output_blocks|middle_block)_", m.body):
            return "sdxl", "UNet keys in SGM naming (kohya writes these for SDXL)"
        if m.component == "unet" and re.search(r"transformer_blocks_([2-9]|\d\d)_", m.body):
            return "sdxl", "transformer depth > 2"
    for m in modules.values():
        if m.component == "te1" and re.search(r"self_attn_q_proj$", m.body):
            width = _input_width(m.adapter)
            if width in (768, 1024):
                return ("sd1" if width == 768 else "sd2"), f"text encoder width {width}"
    return "unknown", "no metadata and no telling key shape"


# --------------------------------------------------------------------------------------------------
# Binding a network to a model

@dataclass
class LoadReport:
    network: str
    model_arch: str
    network_arch: str
    matched: list = field(default_factory=list)        # (module name, target weight)
    unmatched: list = field(default_factory=list)      # (module name, reason)
    skipped: list = field(default_factory=list)        # (module name, reason) matched but unusable
    unknown_keys: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.matched)

    def summary(self) -> str:
        s = f"{self.network}: {len(self.matched)} modules matched"
        if self.unmatched:
            s += f", {len(self.unmatched)} not in the model"
        if self.skipped:
            s += f", {len(self.skipped)} skipped (shape)"
        if self.unknown_keys:
            s += f", {len(self.unknown_keys)} unknown keys"
        if self.network_arch not in ("unknown", self.model_arch) and self.model_arch != "unknown":
            s += f"; made for {self.network_arch}, model is {self.model_arch}"
        return s

    def warnings(self) -> list:
        out = []
        if self.unmatched or self.skipped or self.unknown_keys:
            out.append(self.summary())
        elif self.network_arch not in ("unknown", self.model_arch) and self.model_arch != "unknown":
            out.append(self.summary())
        return out

    def to_dict(self) -> dict:
        return {"network": self.network, "model_arch": self.model_arch, "network_arch": self.network_arch,
                "matched": len(self.matched), "unmatched": [list(x) for x in self.unmatched],
                "skipped": [list(x) for x in self.skipped], "unknown_keys": list(self.unknown_keys)}


@dataclass
class Binding:
    network: Network
    pairs: list          # (Target, NetworkModule)
    report: LoadReport


def _misfit(mod: NetworkModule, t: Target) -> Optional[str]:
    """Why a module's delta cannot land on a target (None: it fits)."""
    if not mod.adapter.fits(t.shape):
        return f"delta of {mod.algo} does not fit weight {t.label} {t.shape}"
    bias = mod.bias_delta if mod.bias_delta is not None else mod.adapter.bias_delta()
    if bias is not None and (t.bias is None or bias.numel() != t.shape[0]):
        return f"bias delta {tuple(bias.shape)} has no matching bias in {t.module}"
    if mod.dora_scale is not None and mod.dora_scale.numel() not in (t.shape[0], t.shape[1] if len(t.shape) > 1 else -1):
        return f"dora_scale {tuple(mod.dora_scale.shape)} does not fit {t.shape}"
    return None


def _split(mod: NetworkModule, group: tuple) -> tuple:
    """A module on a fused original weight (`qkv`, `linear1`) onto the split weights of a diffusers-layout
    model: ([(Target, row-sliced module), ...], None), or ([], reason) where the type's ΔW rows cannot be
    taken apart (see `Adapter.rows`)."""
    total = group[-1][1][1]
    out = mod.adapter.out_features()
    if out > 0 and out != total:   # (IA3 answers -1: any number of rows)
        return [], (f"delta of {mod.algo} has {out} rows; the split weights "
                    f"{', '.join(t.module for t, _ in group)} have {total}")
    parts = []
    for t, (start, stop) in group:
        part = mod.rows(start, stop)
        if part is None:
            return [], (f"a {mod.algo} module on a fused weight cannot be split onto the separate weights "
                        f"{', '.join(t.module for t, _ in group)} of this diffusers-layout model "
                        "(its ΔW rows do not factor apart); use the model's original single-file layout")
        parts.append((t, part))
    return parts, None


def bind(network: Network, model: ModelMap, *, components: Optional[set] = None) -> Binding:
    """Match every module of `network` to a target of `model`, checking shapes.

    Raises ModelMismatchError when nothing matches; otherwise every miss is in the report.
    """
    report = LoadReport(network=network.name, model_arch=model.arch, network_arch=network.base_model,
                        unknown_keys=list(network.unknown_keys))
    pairs = []
    for (comp, body), mod in network.modules.items():
        label = f"{comp}:{body}"
        if components is not None and comp not in components:
            continue
        if comp not in model.roots:
            report.unmatched.append((label, f"the model has no {comp} component"))
            continue
        t: Optional[Target] = model.lookup(comp, body)
        if t is None:
            group = model.lookup_group(comp, body)
            if group is None:
                report.unmatched.append((label, "no such module in the model"))
                continue
            parts, reason = _split(mod, group)
            if reason:
                report.skipped.append((label, reason))
                continue
        else:
            parts = [(t, mod)]
        for t, part in parts:
            reason = _misfit(part, t)
            if reason:
                report.skipped.append((label, reason))
                continue
            pairs.append((t, part))
            report.matched.append((label, t.label))
    if not pairs:
        raise ModelMismatchError(
            f"no module of this network fits the loaded {model.arch} model "
            f"({len(report.unmatched)} not in the model, {len(report.skipped)} of the wrong shape; "
            f"the network looks made for {network.base_model})", file=str(network.path))
    return Binding(network=network, pairs=pairs, report=report)
