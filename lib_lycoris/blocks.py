"""Block maps and LoRA Block Weight (LBW) lists: SD1.x, SD2.x and SDXL UNets, SD3 and Flux transformers.

This module owns two things:

1. Which block a module belongs to: `block_id()` maps a text-encoder module to 'BASE' and a UNet module path
   (original LDM/SGM style `input_blocks.4.1...` or diffusers style `down_blocks.1.attentions.0...`, with
   '.' or '_' separators) to an LBW id 'IN00'..'IN11', 'M00', 'OUT00'..'OUT11' (SDXL: IN00..IN08, OUT00..OUT08).
   The maps follow research/syntax_features.md §3.3 (A1111 `convert_diffusers_name_to_compvis`, kohya
   `get_lbw_block_index`). Modules outside the blocks (time embedding, SDXL label embedding, the final
   norm/conv `out.*`) return None: they take the UNet weight only, no in/mid/out or LBW factor, as LBW does
   ("Unknown modules" keep ratio 1). `conv_in` is `input_blocks.0.0`, i.e. IN00.
   Transformer denoisers (SD3, Flux) use the ids of LBW's Flux list (`BLOCKIDFLUX`): text encoders 'CLIP'
   (CLIP-L, CLIP-G) and 'T5', the input embedders 'IN', double-stream blocks 'D00'.. (Flux `double_blocks`,
   SD3 `joint_blocks`), Flux's single-stream blocks 'S00'..'S37', the final layer 'OUT'. in/mid/out on a
   transformer are the first, middle and last third of its block sequence (Flux: D00-D18, S00-S18,
   S19-S37; SD3 depth 24: D00-D07, D08-D15, D16-D23), plus 'IN' with in and 'OUT' with out; the id
   carries its group (`BlockId.coarse`), since SD3's depth varies.
2. LBW weight lists: 12/17/20/26 values in the standard id orders (LBW `BLOCKID12/17/20/26`), presets built in
   (`presets/lbw_presets.txt`) and user presets from `lbw_presets.txt` in the extension folder. A list
   shorter than 26 gives 0 to the ids it does not name (LBW `to26`). Flux: 61 values (LBW's order CLIP, T5,
   IN, D00-D18, S00-S37, OUT); SD3: 4 + depth values in the same order (28 for SD3/SD3.5 Medium, 42 for
   SD3.5 Large), our convention where LBW defines none.
"""
from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

from .errors import LycorisError, TagError
from .schedule import ScheduleError, format_number, parse_number

__all__ = [
    "ARCHS",
    "BLOCK_IDS_FLUX",
    "BlockId",
    "BLOCK_IDS_12",
    "BLOCK_IDS_17",
    "BLOCK_IDS_20",
    "BLOCK_IDS_26",
    "BUILTIN_PRESETS_FILE",
    "LBW_ORDERS",
    "USER_PRESETS_FILENAME",
    "BlockMapError",
    "BlockWeightError",
    "BlockWeights",
    "arch_block_ids",
    "block_id",
    "builtin_presets",
    "coarse_block",
    "expand_lbw",
    "load_presets",
    "load_user_presets",
    "parse_lbw",
    "parse_presets",
]

logger = logging.getLogger("lycoris")

ARCHS = ("sd1", "sd2", "sdxl", "sd3", "flux")
UNET_ARCHS = ("sd1", "sd2", "sdxl")
DIT_ARCHS = ("sd3", "flux")
COMPONENTS = ("te1", "te2", "te3", "unet")

BLOCK_IDS_26: tuple[str, ...] = (("BASE",) + tuple(f"IN{i:02d}" for i in range(12)) + ("M00",)
                                 + tuple(f"OUT{i:02d}" for i in range(12)))
BLOCK_IDS_17: tuple[str, ...] = ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00",
                                 "OUT03", "OUT04", "OUT05", "OUT06", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11")
BLOCK_IDS_12: tuple[str, ...] = ("BASE", "IN04", "IN05", "IN07", "IN08", "M00",
                                 "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05")
BLOCK_IDS_20: tuple[str, ...] = (("BASE",) + tuple(f"IN{i:02d}" for i in range(9)) + ("M00",)
                                 + tuple(f"OUT{i:02d}" for i in range(9)))
# LBW's Flux list (BLOCKIDFLUX, 61 ids).
BLOCK_IDS_FLUX: tuple[str, ...] = (("CLIP", "T5", "IN") + tuple(f"D{i:02d}" for i in range(19))
                                   + tuple(f"S{i:02d}" for i in range(38)) + ("OUT",))
# SD3 depths in the wild: 24 (SD3 Medium, SD3.5 Medium), 38 (SD3.5 Large).
SD3_DEPTHS = (24, 38)


def sd3_block_ids(depth: int) -> tuple[str, ...]:
    """CLIP, T5, IN, D00..D{depth-1}, OUT: the SD3 list order (4 + depth values)."""
    return ("CLIP", "T5", "IN") + tuple(f"D{i:02d}" for i in range(depth)) + ("OUT",)


# Standard list lengths -> id order (LBW scripts/lora_block_weight.py BLOCKID12/17/20/26/FLUX; kohya LAYER12/17/20/26).
LBW_ORDERS: dict[int, tuple[str, ...]] = {12: BLOCK_IDS_12, 17: BLOCK_IDS_17, 20: BLOCK_IDS_20, 26: BLOCK_IDS_26,
                                          61: BLOCK_IDS_FLUX, **{4 + d: sd3_block_ids(d) for d in SD3_DEPTHS}}

# Number of input/output blocks: SD1/SD2 have 4 levels (12 each), SDXL 3 levels (9 each).
_LAST_BLOCK_INDEX = {"sd1": 11, "sd2": 11, "sdxl": 8}

BUILTIN_PRESETS_FILE = Path(__file__).resolve().parent / "presets" / "lbw_presets.txt"
USER_PRESETS_FILENAME = "lbw_presets.txt"

# Prefixes a caller may leave on a UNet module path; stripped before matching.
_PREFIXES = re.compile(r"^(?:model[._])?(?:diffusion_model[._]|lora_unet[._]|unet[._])?")
_SEP = r"[._]"
_LDM_IN = re.compile(rf"input_blocks{_SEP}(\d+)(?:{_SEP}|$)")
_LDM_MID = re.compile(rf"middle_block(?:{_SEP}|$)")
_LDM_OUT = re.compile(rf"output_blocks{_SEP}(\d+)(?:{_SEP}|$)")
_DIF_DOWN = re.compile(rf"down_blocks{_SEP}(\d+){_SEP}(resnets|attentions){_SEP}(\d+)(?:{_SEP}|$)")
_DIF_DOWNSAMPLE = re.compile(rf"down_blocks{_SEP}(\d+){_SEP}downsamplers(?:{_SEP}|$)")
_DIF_MID = re.compile(rf"mid_block(?:{_SEP}|$)")
_DIF_UP = re.compile(rf"up_blocks{_SEP}(\d+){_SEP}(resnets|attentions){_SEP}(\d+)(?:{_SEP}|$)")
_DIF_UPSAMPLE = re.compile(rf"up_blocks{_SEP}(\d+){_SEP}upsamplers(?:{_SEP}|$)")
_DIF_CONV_IN = re.compile(rf"conv_in(?:{_SEP}|$)")
# Modules outside the blocks: LDM time_embed, SDXL label_emb, final out.0 (norm) / out.2 (conv);
# diffusers time_embedding, add_embedding (SDXL), conv_norm_out, conv_out.
_OUTSIDE = re.compile(rf"(?:time_embed|time_embedding|label_emb|add_embedding|conv_norm_out|conv_out|out)(?:{_SEP}|$)")


class BlockId(str):
    """A block id that knows its in/mid/out group (transformer blocks, where the id alone cannot tell)."""

    coarse: Optional[str]

    def __new__(cls, value: str, coarse: Optional[str]) -> "BlockId":
        obj = super().__new__(cls, value)
        obj.coarse = coarse
        return obj


def _third(position: int, length: int) -> str:
    """in / mid / out: the first, middle or last third of a block sequence of `length`."""
    third = round(length / 3)
    return "in" if position < third else "out" if position >= length - third else "mid"


_DIT_IN = re.compile(r"^(x_embedder|pos_embed|context_embedder|t_embedder|y_embedder|img_in|txt_in|time_in|"
                     r"vector_in|guidance_in|time_text_embed)(?:[._]|$)")
_DIT_OUT = re.compile(rf"^(final_layer|proj_out|norm_out)(?:{_SEP}|$)")
# Original names, and the diffusers ones (`inspect` sees file bodies in either style).
_DIT_BLOCK = re.compile(rf"^(joint_blocks|double_blocks|single_blocks|transformer_blocks|single_transformer_blocks)"
                        rf"{_SEP}(\d+)(?:{_SEP}|$)")


def _dit_block(path: str, arch: str, depth: tuple) -> Optional[str]:
    """Block id of a transformer module given by its original path (see module doc)."""
    if _DIT_IN.match(path):
        return BlockId("IN", "in")
    if _DIT_OUT.match(path):
        return BlockId("OUT", "out")
    m = _DIT_BLOCK.match(path)
    if m is None:
        raise BlockMapError(f"no block map knows the {arch} module {path!r}", key=path)
    n = int(m.group(2))
    double = depth[0] if depth else (19 if arch == "flux" else 24)
    single = depth[1] if len(depth) > 1 else (38 if arch == "flux" else 0)
    if m.group(1) in ("single_blocks", "single_transformer_blocks"):
        if n >= single:
            raise BlockMapError(f"single block {n} does not exist in this {arch} model", key=path)
        return BlockId(f"S{n:02d}", _third(double + n, double + single))
    if n >= double:
        raise BlockMapError(f"block {n} does not exist in this {arch} model", key=path)
    return BlockId(f"D{n:02d}", _third(n, double + single))


class BlockMapError(LycorisError):
    """A module path, component or architecture that no block map knows."""


class BlockWeightError(TagError):
    """A block weight list or preset is malformed (wrong length, bad number, unknown preset)."""


def arch_block_ids(arch: str, depth: int = 24) -> tuple[str, ...]:
    """The LBW ids that exist in `arch`: BASE, IN00.., M00, OUT.. (26 for SD1/SD2, 20 for SDXL); Flux's 61;
    SD3's 4 + depth."""
    if arch == "flux":
        return BLOCK_IDS_FLUX
    if arch == "sd3":
        return sd3_block_ids(depth)
    if arch not in _LAST_BLOCK_INDEX:
        raise BlockMapError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHS)}")
    return BLOCK_IDS_20 if arch == "sdxl" else BLOCK_IDS_26


def _checked(prefix: str, index: int, arch: str, path: str) -> str:
    if index > _LAST_BLOCK_INDEX[arch]:
        raise BlockMapError(f"{prefix} block {index} does not exist in {arch}", key=path)
    return f"{prefix}{index:02d}"


def block_id(component: str, unet_path: Optional[str], arch: str, depth: tuple = ()) -> Optional[str]:
    """LBW block id of one module.

    Args:
        component: 'te1' | 'te2' | 'unet'.
        unet_path: for 'unet', the module path inside the UNet, LDM/SGM style ('input_blocks.4.1.proj_in')
            or diffusers style ('down_blocks.1.attentions.0.proj_in'); '.' or '_' separators; a leading
            'diffusion_model.', 'lora_unet_' or 'unet.' is ignored. Ignored for text encoders.
            For 'sd3'/'flux', the module's original path (`joint_blocks.3.x_block.attn.qkv`, `single_blocks.0.linear1`).
        arch: 'sd1' | 'sd2' | 'sdxl' | 'sd3' | 'flux'.
        depth: transformers: (double/joint blocks, single blocks) of the model (default: Flux 19 + 38, SD3 24).

    Returns:
        'BASE' for text encoders ('CLIP' / 'T5' on transformers); 'IN00'.., 'M00', 'OUT00'.. for UNet blocks;
        None for UNet modules outside the blocks (time embedding, label embedding, final norm and conv);
        a `BlockId` for transformer modules.

    Raises:
        BlockMapError: unknown component or architecture, a path that names no UNet module, or a block index
            the architecture does not have.
    """
    arch_block_ids(arch)  # validates arch
    dit = arch in DIT_ARCHS
    if component in ("te1", "te2", "te3"):
        return ("T5" if component == "te3" else "CLIP") if dit else "BASE"
    if component != "unet":
        raise BlockMapError(f"unknown component {component!r}; expected one of {', '.join(COMPONENTS)}")
    if not unet_path:
        raise BlockMapError("a UNet module needs its path", key=str(unet_path))
    path = _PREFIXES.sub("", unet_path.strip(), count=1)
    if dit:
        return _dit_block(path, arch, depth)
    last = _LAST_BLOCK_INDEX[arch]
    m = _LDM_IN.match(path)
    if m:
        return _checked("IN", int(m.group(1)), arch, unet_path)
    if _LDM_MID.match(path) or _DIF_MID.match(path):
        return "M00"
    m = _LDM_OUT.match(path)
    if m:
        return _checked("OUT", int(m.group(1)), arch, unet_path)
    if _DIF_CONV_IN.match(path):
        return "IN00"
    levels = last // 3 + 1  # 4 levels (SD1/SD2) or 3 (SDXL)
    m = _DIF_DOWN.match(path)
    if m:
        level, j = int(m.group(1)), int(m.group(3))
        if level >= levels or j > 1:
            raise BlockMapError(f"down block {level}.{j} does not exist in {arch}", key=unet_path)
        return _checked("IN", 3 * level + j + 1, arch, unet_path)
    m = _DIF_DOWNSAMPLE.match(path)
    if m:
        return _checked("IN", 3 * (int(m.group(1)) + 1), arch, unet_path)
    m = _DIF_UP.match(path)
    if m:
        level, j = int(m.group(1)), int(m.group(3))
        if level >= levels or j > 2:
            raise BlockMapError(f"up block {level}.{j} does not exist in {arch}", key=unet_path)
        return _checked("OUT", 3 * level + j, arch, unet_path)
    m = _DIF_UPSAMPLE.match(path)
    if m:
        return _checked("OUT", 3 * int(m.group(1)) + 2, arch, unet_path)
    if _OUTSIDE.match(path):
        return None
    raise BlockMapError(f"no block map knows the UNet module {unet_path!r}", key=unet_path)


def coarse_block(block: Optional[str]) -> Optional[str]:
    """'te' for BASE, 'in' for IN*, 'mid' for M00, 'out' for OUT*, None for None (outside the blocks)."""
    if block is None:
        return None
    coarse = getattr(block, "coarse", None)
    if coarse is not None:
        return coarse
    if block in ("BASE", "CLIP", "T5"):
        return "te"
    if block.startswith("IN"):
        return "in"
    if block.startswith("M"):
        return "mid"
    if block.startswith("OUT"):
        return "out"
    raise BlockMapError(f"unknown block id {block!r}")


def expand_lbw(values: Sequence[float]) -> dict[str, float]:
    """A 12/17/20/26-value list -> weight of every one of the 26 ids (ids the list does not name get 0);
    a Flux (61) or SD3 (4 + depth) list -> the weight of each of its ids.

    Raises:
        BlockWeightError: the length is not a standard one.
    """
    order = LBW_ORDERS.get(len(values))
    if order is None:
        raise BlockWeightError(f"a block weight list has 12, 17, 20 or 26 values (SD1/SD2/SDXL), 61 (Flux) or "
                               f"{' or '.join(str(4 + d) for d in SD3_DEPTHS)} (SD3), not {len(values)}")
    weights = dict.fromkeys(order if len(values) not in (12, 17, 20, 26) else BLOCK_IDS_26, 0.0)
    weights.update(zip(order, (float(v) for v in values)))
    return weights


def _parse_values(text: str) -> tuple[float, ...]:
    try:
        return tuple(parse_number(v, "block weight") for v in text.split(","))
    except ScheduleError as e:
        raise BlockWeightError(e.message) from e


def parse_presets(text: str, source: str = "presets") -> tuple[dict[str, tuple[float, ...]], list[str]]:
    """Parse preset lines `NAME:v1,v2,...` ('#' comments, blank lines skipped).

    Returns:
        (presets by name, warnings about skipped lines). A bad line never stops the others.
    """
    presets: dict[str, tuple[float, ...]] = {}
    warnings: list[str] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, values = line.partition(":")
        name = name.strip()
        if not sep or not name:
            warnings.append(f"{source} line {number}: expected NAME:v1,v2,..., got {raw.strip()!r}")
            continue
        try:
            parsed = _parse_values(values)
            expand_lbw(parsed)
        except BlockWeightError as e:
            warnings.append(f"{source} line {number} ({name}): {e.message}; preset skipped")
            continue
        presets[name] = parsed
    return presets, warnings


def load_presets(path: Union[str, Path]) -> tuple[dict[str, tuple[float, ...]], list[str]]:
    """Read a preset file. A missing file gives no presets and no warning; an unreadable one a warning."""
    p = Path(path)
    if not p.is_file():
        return {}, []
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        return {}, [f"cannot read block weight presets {str(p)!r}: {e}"]
    return parse_presets(text, source=str(p))


@functools.lru_cache(maxsize=1)
def _builtin_presets_items() -> tuple[tuple[str, tuple[float, ...]], ...]:
    presets, warnings = load_presets(BUILTIN_PRESETS_FILE)
    for w in warnings:  # a broken shipped file is our bug: make it loud in the log
        logger.error("built-in LBW presets: %s", w)
    return tuple(presets.items())


def builtin_presets() -> dict[str, tuple[float, ...]]:
    """The presets shipped with the extension (LBW's standard ones); a fresh dict on every call."""
    return dict(_builtin_presets_items())


def load_user_presets(extension_root: Union[str, Path]) -> tuple[dict[str, tuple[float, ...]], list[str]]:
    """Built-in presets updated with the user's `lbw_presets.txt` in `extension_root` (user wins)."""
    presets = builtin_presets()
    user, warnings = load_presets(Path(extension_root) / USER_PRESETS_FILENAME)
    presets.update(user)
    return presets, warnings


@dataclass(frozen=True)
class BlockWeights:
    """An `lbw=` value: the text as written (preset name or list) and the weight of each of the 26 ids."""

    text: str
    weights: tuple[tuple[str, float], ...]

    def get(self, block: str) -> float:
        """Weight of one LBW id (1.0 for ids outside the 26, e.g. unknown)."""
        for name, value in self.weights:
            if name == block:
                return value
        return 1.0

    def as_dict(self) -> dict[str, float]:
        return dict(self.weights)

    def fits(self, arch: str, depth: int = 24) -> bool:
        """Whether these weights name the blocks of `arch` (a UNet list on Flux would weight nothing)."""
        ids = {name for name, _ in self.weights}
        return set(arch_block_ids(arch, depth)) <= ids if arch in ARCHS else True


def parse_lbw(text: str, presets: Optional[Mapping[str, Sequence[float]]] = None) -> BlockWeights:
    """Parse an `lbw=` value: a preset name or a comma list of 12/17/20/26 numbers.

    Args:
        text: the value.
        presets: name -> values; None means the built-in presets. Names match exactly, else case-insensitively.

    Raises:
        BlockWeightError: unknown preset, bad number, wrong length.
    """
    stripped = text.strip()
    if not stripped:
        raise BlockWeightError("empty block weights")
    if "," in stripped:
        values = _parse_values(stripped)
        weights = expand_lbw(values)
        canonical = ",".join(format_number(v) for v in values)
    else:
        table = builtin_presets() if presets is None else presets
        found = table.get(stripped)
        if found is None:
            folded = [k for k in table if k.casefold() == stripped.casefold()]
            if len(folded) == 1:
                stripped, found = folded[0], table[folded[0]]
        if found is None:
            known = ", ".join(sorted(table)) or "none"
            raise BlockWeightError(f"unknown block weight preset {stripped!r} (known: {known})")
        weights = expand_lbw(tuple(found))
        canonical = stripped
    return BlockWeights(canonical, tuple(weights.items()))
