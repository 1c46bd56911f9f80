"""SD3 / SD3.5 / Flux.1 transformers against independent code (diffusers, PEFT, the official LyCORIS package).

Models are tiny diffusers `SD3Transformer2DModel` / `FluxTransformer2DModel` configs; their ORIGINAL single-file
layout (SAI `joint_blocks`, BFL `double_blocks`/`single_blocks`) is written by hand and turned into the diffusers
layout by diffusers' own checkpoint converters (fixtures/dit.py), so every name and row correspondence used
here comes from diffusers, never from the engine.

1. diffusers oracle: LoRA files in the diffusers/PEFT, kohya, XLabs, OneTrainer and ComfyUI styles, loaded by
   diffusers (`lora_state_dict` conversions, `load_lora_adapter`, `fuse_lora`); our merge on the diffusers
   layout and on the original layout (converted afterwards by diffusers) must give the fused weights.
2. LyCORIS oracle: official modules (LoCon, DoRA, LoHa, LoKr, full, IA3, diag-OFT) on the fused original
   names and on the split diffusers names (a row slice of `qkv` / `linear1`, an adaLN weight in diffusers'
   half order), read out of the official forward; a type that cannot be split onto separate weights must be
   reported with its reason, never half-applied.
3. Patcher on an original-layout module tree: a split-name and a fused-name network stacked = merge =
   diffusers with both adapters fused; apply twice is a no-op; restore is bit-exact.
4. What `inspect` / `load_network` tell about a file's base model.
"""
from __future__ import annotations

import io
import json

import pytest
import torch

from fixtures import dit as D
from lib_lycoris.cli import main as cli_main
from lib_lycoris.errors import PartialMergeError
from lib_lycoris.inspect import describe
from lib_lycoris.merge import merge_state_dict
from lib_lycoris.modelmap import ModelMap
from lib_lycoris.network import base_model_of_file, flux_variant, load_network
from lib_lycoris.patcher import Patcher, Strength

# float32 merges against float32 (diffusers) or float64 (LyCORIS readout) references, relative to the
# largest reference value; 10x looser for diag-OFT, whose official reference can only run in float32.
RTOL = 1e-5
# A module the file names must move its weight by at least this fraction of the weight's scale.
MIN_CHANGE = 0.05

NATIVE, DIFF = D.NATIVE_PREFIX, D.DIFFUSERS_PREFIX


def _close(got: torch.Tensor, ref: torch.Tensor, name: str, precision: torch.dtype = torch.float64) -> None:
    assert got.shape == ref.shape, (name, got.shape, ref.shape)
    scale = ref.double().abs().max().item() + 1e-12
    err = (got.double() - ref.double()).abs().max().item() / scale
    tol = RTOL if precision == torch.float64 else 10 * RTOL
    assert err < tol, f"{name}: relative error {err:.2e}"


def _changed(new: torch.Tensor, old: torch.Tensor) -> float:
    return (new.double() - old.double()).abs().max().item() / (old.double().abs().max().item() + 1e-12)


def _clean(reports) -> None:
    for r in reports:
        assert not r.unmatched and not r.skipped and not r.unknown_keys, r.summary() + repr(r.to_dict())


def _strip(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _compare_all(got: dict, expected: dict, base: dict, precision=torch.float64, where: str = "") -> None:
    """Every weight: those `expected` lists close to it, every other one bit-identical to `base`."""
    assert got.keys() == base.keys(), set(got) ^ set(base)
    for k, b in base.items():
        if k in expected:
            _close(got[k], expected[k], f"{where}{k}", precision)
        else:
            assert torch.equal(got[k], b), f"{where}{k} changed; no module of the file names it"


# ---------------------------------------------------------------------------------------------------
# The fixtures' layouts and the engine's reading of them
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(D.CONFIGS))
def test_layouts_load_strictly_and_are_told_apart(name):
    """The hand-written original layout is complete: diffusers' converter consumes it and the converted dict
    loads strictly into the diffusers model. The engine tells the family of both layouts (prefixed, bare)."""
    native = D.native_state_dict(name, prefix="")
    converted = D.to_diffusers(name, native)
    model = D.diffusers_model(name, converted)          # load_state_dict(strict=True)
    assert set(model.state_dict()) == set(converted)
    fam = D.family(name)
    layouts = {"native prefixed": D.native_state_dict(name), "diffusers prefixed": D.diffusers_state_dict(name),
               "diffusers bare": D.diffusers_state_dict(name, prefix="")}
    if fam == "flux":
        layouts["BFL bare (Forge)"] = native
    for label, sd in layouts.items():
        mm = ModelMap.from_state_dict(sd)
        assert (mm.arch, mm.family) == (fam, fam), (label, mm.arch, mm.family)


# ---------------------------------------------------------------------------------------------------
# 1. diffusers oracle
# ---------------------------------------------------------------------------------------------------

def _diffusers_cases():
    for name, styles in D.DIFFUSERS_STYLES.items():
        for style in styles:
            for mult in ((1.0, 0.6) if style == "peft" else (0.8,)):
                yield pytest.param(name, style, mult, id=f"{name}-{style}@{mult}")


@pytest.mark.parametrize("name,style,mult", list(_diffusers_cases()))
def test_lora_styles_match_diffusers_fuse(tmp_path, name, style, mult):
    file_sd = D.style_file(name, style, seed=11)
    path = D.save(file_sd, tmp_path / f"{style}.safetensors")
    net = load_network(path)
    with D.quiet():
        adapter = D.lora_state_dict(name, file_sd)
        expected = D.diffusers_fused(name, [(adapter, mult)])
    base = D.to_diffusers(name, D.native_state_dict(name, prefix=""))
    named = {k[len(DIFF):-len(".lora_A.weight")] + ".weight" for k in adapter if k.endswith(".lora_A.weight")}
    assert named, "vacuous: diffusers loaded no module of the file"
    # The oracle itself: every module the file names moved clearly, nothing else moved.
    for k, b in base.items():
        if k in named:
            assert _changed(expected[k], b) > MIN_CHANGE, f"{k}: the file barely changes it"
        else:
            assert torch.equal(expected[k], b), f"{k}: diffusers changed a weight the file does not name"
    want = {k: expected[k] for k in named}

    # (i) the diffusers layout, `transformer.` prefix
    sd = D.diffusers_state_dict(name)
    _clean(merge_state_dict(sd, [(net, Strength(mult))], device="cpu"))
    _compare_all(_strip(sd, DIFF), want, base, where="diffusers layout: ")

    # (ii) the original layout under `model.diffusion_model.`, converted by diffusers afterwards
    sd = D.native_state_dict(name)
    _clean(merge_state_dict(sd, [(net, Strength(mult))], device="cpu"))
    _compare_all(D.to_diffusers(name, sd), want, base, where="original layout: ")


def test_flux_bare_bfl_layout_merges_like_the_prefixed_one(tmp_path):
    """Forge hands over the BFL transformer without `model.diffusion_model.`."""
    path = D.save(D.style_file("flux", "kohya", seed=5), tmp_path / "k.safetensors")
    net = load_network(path)
    prefixed, bare = D.native_state_dict("flux"), D.native_state_dict("flux", prefix="")
    _clean(merge_state_dict(prefixed, [(net, Strength(0.9))], device="cpu"))
    _clean(merge_state_dict(bare, [(net, Strength(0.9))], device="cpu"))
    assert _strip(prefixed, NATIVE).keys() == bare.keys()
    for k, v in bare.items():
        assert torch.equal(prefixed[NATIVE + k], v), k
    assert any(not torch.equal(v, D.native_state_dict("flux", prefix="")[k]) for k, v in bare.items())


# ---------------------------------------------------------------------------------------------------
# 2. official LyCORIS oracle
# ---------------------------------------------------------------------------------------------------

ALGOS = list(D.ALGOS)
# What a fused-name module may be split into on a diffusers-layout model (ΔW rows factor apart exactly).
SPLITTABLE = {"lora", "lora-dora", "loha", "full", "ia3"}
LYCO_MULT = 0.7   # DoRA and OFT are not linear in the multiplier: a value other than 1 tests their rule

FUSED_NAMES = {
    "sd3": ["joint_blocks.0.x_block.attn.qkv", "joint_blocks.2.context_block.attn.qkv",
            "joint_blocks.1.x_block.mlp.fc1", "joint_blocks.2.context_block.adaLN_modulation.1",
            "final_layer.adaLN_modulation.1"],
    "sd35m": ["joint_blocks.0.x_block.attn.qkv", "joint_blocks.0.x_block.attn2.qkv",
              "joint_blocks.1.context_block.attn.qkv", "joint_blocks.0.x_block.adaLN_modulation.1",
              "joint_blocks.1.context_block.adaLN_modulation.1"],
    "flux": ["double_blocks.0.img_attn.qkv", "double_blocks.1.txt_attn.qkv", "single_blocks.0.linear1",
             "single_blocks.1.linear2", "double_blocks.0.img_mod.lin", "final_layer.adaLN_modulation.1"],
}
FUSED = {"attn.qkv", "attn2.qkv", "linear1"}   # original modules a diffusers model holds as several weights

SPLIT_NAMES = {
    "sd3": ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
            "transformer_blocks.1.attn.add_v_proj", "transformer_blocks.2.norm1_context.linear",
            "norm_out.linear", "transformer_blocks.0.ff.net.0.proj"],
    "sd35m": ["transformer_blocks.0.attn2.to_v", "transformer_blocks.0.attn.add_k_proj",
              "transformer_blocks.1.norm1_context.linear", "transformer_blocks.0.norm1.linear"],
    "flux": ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_v",
             "transformer_blocks.1.attn.add_k_proj", "single_transformer_blocks.0.attn.to_v",
             "single_transformer_blocks.1.attn.to_k", "single_transformer_blocks.1.proj_mlp",
             "single_transformer_blocks.0.norm.linear", "norm_out.linear"],
}


def _lyco_cases():
    for name in D.CONFIGS:
        for algo in ALGOS:
            yield pytest.param(name, algo, id=f"{name}-{algo}")


def _expected_diffusers(name: str, lyco: D.LycoNetwork) -> dict:
    """The reference in diffusers names: the full original dict with the merged weights, converted by diffusers."""
    full = {k: v.double() for k, v in D.native_state_dict(name, prefix="").items()}
    full.update(lyco.expected)
    conv = D.to_diffusers(name, full)
    base = D.to_diffusers(name, D.native_state_dict(name, prefix=""))
    return {k: v for k, v in conv.items() if not torch.equal(v.float(), base[k])}


def _check_native(name: str, lyco: D.LycoNetwork, path, mult: float) -> None:
    net = load_network(path)
    sd = D.native_state_dict(name)
    _clean(merge_state_dict(sd, [(net, Strength(mult))], device="cpu"))
    base = D.native_state_dict(name, prefix="")
    assert lyco.expected, "vacuous case"
    for k, v in lyco.expected.items():
        assert _changed(v, lyco.base[k]) > MIN_CHANGE / 10, f"{k}: the official module barely changes it"
    _compare_all(_strip(sd, NATIVE), lyco.expected, base, lyco.precision, where="original layout: ")


@pytest.mark.parametrize("name,algo", list(_lyco_cases()))
def test_lycoris_on_fused_original_names(tmp_path, name, algo):
    """`lycoris_joint_blocks_0_x_block_attn_qkv` etc.: the official module on the whole original weight.

    Original layout: every type. Diffusers layout: the fused module is split by rows onto to_q/to_k/to_v
    (proj_mlp) where the type's ΔW rows factor apart (LoRA, DoRA on the output axis, LoHa, full); other types
    are reported as skipped with the reason, and those weights stay untouched."""
    targets = [(f"lycoris_{m.replace('.', '_')}", D.Region(m)) for m in FUSED_NAMES[name]]
    lyco = D.lyco_network(name, algo, targets, LYCO_MULT, seed=1)
    path = D.save(lyco.tensors, tmp_path / f"{algo}.safetensors")
    _check_native(name, lyco, path, LYCO_MULT)

    net = load_network(path)
    expected = _expected_diffusers(name, lyco)
    base = D.to_diffusers(name, D.native_state_dict(name, prefix=""))
    fused = {f"unet:{r.native.replace('.', '_')}" for _, r in targets if r.native.endswith(tuple(FUSED))}
    sd = D.diffusers_state_dict(name)
    if algo in SPLITTABLE:
        _clean(merge_state_dict(sd, [(net, Strength(LYCO_MULT))], device="cpu"))
        _compare_all(_strip(sd, DIFF), expected, base, lyco.precision, where="diffusers layout: ")
        return
    with pytest.raises(PartialMergeError):
        merge_state_dict(D.diffusers_state_dict(name), [(net, Strength(LYCO_MULT))], device="cpu")
    (report,) = merge_state_dict(sd, [(net, Strength(LYCO_MULT))], device="cpu", strict=False)
    skipped = dict(report.skipped)
    assert set(skipped) == fused, report.to_dict()
    assert not report.unmatched and not report.unknown_keys, report.to_dict()
    # the split weights of the skipped modules are untouched; every other module merged as the oracle says
    assert all(k.endswith(".weight") for k in expected), "a non-full type changed a bias"
    regions = D.diffusers_regions(name)
    of_fused = {k for k in expected if regions[k[:-len(".weight")]].native.endswith(tuple(FUSED))}
    assert of_fused, "vacuous: no split weight of a fused module in the reference"
    _compare_all(_strip(sd, DIFF), {k: v for k, v in expected.items() if k not in of_fused}, base,
                 lyco.precision, where="diffusers layout: ")


@pytest.mark.parametrize("name,algo", list(_lyco_cases()))
def test_lycoris_on_split_diffusers_names(tmp_path, name, algo):
    """`lycoris_transformer_blocks_0_attn_to_q` etc.: the official module on the diffusers weight, which is a
    row slice of the fused original weight (or its adaLN halves swapped). Original layout: the module's
    merge lands on exactly those rows (DoRA norms, IA3 and OFT computed on the slice it was trained on);
    diffusers layout: on the weight itself."""
    regions = D.diffusers_regions(name)
    targets = [(f"lycoris_{m.replace('.', '_')}", regions[m]) for m in SPLIT_NAMES[name]]
    kinds = {r.kind for _, r in targets}
    assert kinds == {"rows", "swap", "whole"}, kinds        # the case list covers every kind of region
    lyco = D.lyco_network(name, algo, targets, LYCO_MULT, seed=2)
    path = D.save(lyco.tensors, tmp_path / f"{algo}.safetensors")
    _check_native(name, lyco, path, LYCO_MULT)

    sd = D.diffusers_state_dict(name)
    _clean(merge_state_dict(sd, [(load_network(path), Strength(LYCO_MULT))], device="cpu"))
    base = D.to_diffusers(name, D.native_state_dict(name, prefix=""))
    _compare_all(_strip(sd, DIFF), _expected_diffusers(name, lyco), base, lyco.precision,
                 where="diffusers layout: ")


@pytest.mark.parametrize("name,algo", [
    pytest.param(n, a, id=f"{n}-{a}") for n in D.CONFIGS for a in ALGOS if a not in SPLITTABLE])
def test_unsplittable_fused_module_reason(tmp_path, name, algo):
    """The skip reason of a fused-name module a diffusers-layout model cannot take says why and what to do."""
    fused = FUSED_NAMES[name][0]
    whole = next(m for m in FUSED_NAMES[name] if not m.endswith(tuple(FUSED)))
    targets = [(f"lycoris_{m.replace('.', '_')}", D.Region(m)) for m in (fused, whole)]
    lyco = D.lyco_network(name, algo, targets, LYCO_MULT, seed=4)
    net = load_network(D.save(lyco.tensors, tmp_path / "n.safetensors"))
    (report,) = merge_state_dict(D.diffusers_state_dict(name), [(net, Strength(1.0))], device="cpu", strict=False)
    ((label, reason),) = report.skipped
    assert label == f"unet:{fused.replace('.', '_')}"
    assert "cannot be split" in reason and "original single-file layout" in reason, reason


def _style_targets(name: str, style: str) -> list:
    if style == "kohya":
        return [(f"lora_unet_{m.replace('.', '_')}", r) for m, r in D.native_regions(name).items()]
    if style == "comfyui":
        return [(f"diffusion_model.{m}", r) for m, r in D.native_regions(name).items()]
    if style == "onetrainer":
        return [(f"lora_transformer_{m.replace('.', '_')}", r) for m, r in D.diffusers_regions(name).items()]
    raise ValueError(style)


@pytest.mark.parametrize("style", ["kohya", "comfyui", "onetrainer"])
@pytest.mark.parametrize("name", list(D.CONFIGS))
def test_lora_styles_match_official_locon(tmp_path, name, style):
    """kohya `lora_unet_joint_blocks_0_x_block_attn_qkv` (+alpha), ComfyUI `diffusion_model.<original path>`,
    OneTrainer `lora_transformer_<diffusers path>` on EVERY Linear: official LoCon modules, both layouts.
    (SD3 files in these styles have no diffusers converter; Flux's OneTrainer converter covers only attention.)"""
    lyco = D.lyco_network(name, "lora", _style_targets(name, style), 0.75, seed=3)
    path = D.save(lyco.tensors, tmp_path / f"{style}.safetensors")
    _check_native(name, lyco, path, 0.75)
    sd = D.diffusers_state_dict(name)
    _clean(merge_state_dict(sd, [(load_network(path), Strength(0.75))], device="cpu"))
    base = D.to_diffusers(name, D.native_state_dict(name, prefix=""))
    _compare_all(_strip(sd, DIFF), _expected_diffusers(name, lyco), base, where="diffusers layout: ")


# ---------------------------------------------------------------------------------------------------
# 3. Patcher on an original-layout module tree
# ---------------------------------------------------------------------------------------------------

def _snapshot(model: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_patcher_stacks_split_and_fused_networks(tmp_path, name):
    """PEFT split names (to_q, proj_mlp, norm_out in diffusers order) at 0.8 and a fused-name file (Flux:
    kohya `img_attn_qkv`/`linear1`; SD3: kohya `x_block_attn_qkv`) at 0.5 on one original-layout model:
    apply = merge_state_dict = diffusers with both adapters fused; apply again writes nothing; restore is
    bit-exact."""
    split_sd = D.style_file(name, "peft", seed=21)
    fused_sd = D.style_file(name, "kohya", seed=22) if name == "flux" else \
        D.kohya_file(D.native_linears(name), seed=22)
    split = load_network(D.save(split_sd, tmp_path / "split.safetensors"))
    fused = load_network(D.save(fused_sd, tmp_path / "fused.safetensors"))
    items = [(split, Strength(0.8)), (fused, Strength(0.5))]

    sd = D.native_state_dict(name)
    root = D.native_module(sd)
    if name == "sd3":   # a host handing over the bare MMDiT as the 'unet' component
        patcher = Patcher.from_components({"unet": root.model.diffusion_model})
        params = lambda: {NATIVE + k: v for k, v in root.model.diffusion_model.named_parameters()}  # noqa: E731
    else:
        patcher = Patcher(root)
        params = lambda: dict(root.named_parameters())  # noqa: E731
    snap = _snapshot(root)
    stats = patcher.apply(items)
    _clean(stats.reports)
    assert stats.slots_written > 0
    applied = {k: v.detach().clone() for k, v in params().items()}

    merged = D.native_state_dict(name)
    _clean(merge_state_dict(merged, items, device="cpu"))
    assert applied.keys() == merged.keys()
    for k in merged:
        _close(applied[k], merged[k], f"apply vs merge: {k}")

    if name == "flux":   # the independent reference: diffusers with both adapters fused at their strengths
        with D.quiet():
            expected = D.diffusers_fused(name, [(D.lora_state_dict(name, split_sd), 0.8),
                                                (D.lora_state_dict(name, fused_sd), 0.5)])
        got = D.to_diffusers(name, {k: v.clone() for k, v in applied.items()})
        base = D.to_diffusers(name, D.native_state_dict(name, prefix=""))
        changed = {k: v for k, v in expected.items() if not torch.equal(v, base[k])}
        assert len(changed) > 20
        _compare_all(got, changed, base, where="patched vs diffusers: ")

    again = patcher.apply(items)
    assert again.slots_written == 0
    for k, v in params().items():
        assert torch.equal(v.detach(), applied[k]), f"apply twice changed {k}"
    patcher.restore()
    for k, v in root.named_parameters():
        assert torch.equal(v.detach(), snap[k]), f"restore: {k} differs"


# ---------------------------------------------------------------------------------------------------
# 4. base model from a file (inspect)
# ---------------------------------------------------------------------------------------------------

# Real block widths (detection reads shapes, and the tiny models' 16 is no real width): Flux.1 3072,
# SD3 Medium / SD3.5 Medium 1536 (64 x 24), SD3.5 Large 2432 (64 x 38).
REAL_WIDTH = {"flux": 3072, "sd3": 1536, "sd35l": 2432}


def _lora(out: dict, name: str, rows: int, cols: int, style: str) -> None:
    """Rank-2 LoRA tensors of one module at real size, in the key style (`name` already spelled for it)."""
    down, up = torch.full((2, cols), 0.01), torch.full((rows, 2), 0.01)
    if style in ("peft",):
        out.update({f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up})
    elif style == "xlabs":
        out.update({f"{name}.down.weight": down, f"{name}.up.weight": up})
    else:
        out.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(1.0)})


def _real_file(model: str, style: str) -> dict:
    """A few modules of a real-width SD3 / Flux LoRA in `style` (keys and shapes as trainers write them)."""
    w = REAL_WIDTH[model]
    out: dict = {}
    if style == "peft":                 # diffusers / PEFT, double-stream attention only (the hard case)
        _lora(out, "transformer.transformer_blocks.0.attn.to_q", w, w, style)
        _lora(out, "transformer.transformer_blocks.2.attn.add_k_proj", w, w, style)
    elif style == "peft-ff":            # PEFT target_modules=["to_out.0", "ff.net.0.proj"]
        _lora(out, "transformer.transformer_blocks.3.attn.to_out.0", w, w, "peft")
        _lora(out, "transformer.transformer_blocks.3.ff.net.0.proj", 4 * w, w, "peft")
    elif style == "onetrainer":
        _lora(out, "lora_transformer_transformer_blocks_0_attn_to_q", w, w, style)
        _lora(out, "lora_transformer_transformer_blocks_2_attn_add_k_proj", w, w, style)
    elif style == "xlabs":
        _lora(out, "double_blocks.0.processor.qkv_lora1", 3 * w, w, style)
        _lora(out, "double_blocks.0.processor.proj_lora2", w, w, style)
    elif model == "flux" and style in ("kohya", "comfyui"):
        name = "lora_unet_double_blocks_0_img_attn_qkv" if style == "kohya" else \
            "diffusion_model.double_blocks.0.img_attn.qkv"
        _lora(out, name, 3 * w, w, style)
    elif style in ("kohya", "comfyui"):
        name = "lora_unet_joint_blocks_0_x_block_attn_qkv" if style == "kohya" else \
            "diffusion_model.joint_blocks.0.context_block.attn.qkv"
        _lora(out, name, 3 * w, w, style)
    elif style == "lycoris-lokr":       # LoKr on the fused qkv: (8 x 8) kron (3w/8 x w/8), w2 rank 2
        n = "lycoris_joint_blocks_0_x_block_attn_qkv" if model != "flux" else "lycoris_single_blocks_0_linear1"
        rows = 3 * w if model != "flux" else 7 * w
        out.update({f"{n}.lokr_w1": torch.full((8, 8), 0.01), f"{n}.lokr_w2_a": torch.full((rows // 8, 2), 0.01),
                    f"{n}.lokr_w2_b": torch.full((2, w // 8), 0.01), f"{n}.alpha": torch.tensor(1.0)})
    else:
        raise ValueError(style)
    return out


DETECT_STYLES = {"flux": ("peft", "peft-ff", "onetrainer", "xlabs", "kohya", "comfyui", "lycoris-lokr"),
                 "sd3": ("peft", "peft-ff", "onetrainer", "kohya", "comfyui", "lycoris-lokr"),
                 "sd35l": ("peft", "onetrainer", "kohya")}
def _inspect_json(path) -> dict:
    buf = io.StringIO()
    assert cli_main(["inspect", str(path), "--json"], out=buf) == 0
    return json.loads(buf.getvalue())


@pytest.mark.parametrize("model,style", [
    pytest.param(m, s, id=f"{m}-{s}") for m, styles in DETECT_STYLES.items() for s in styles])
def test_base_model_from_keys_and_shapes(tmp_path, model, style):
    """No metadata: `load_network(...).base_model` and the header-only badge (`base_model_of_file`) say sd3 /
    flux from key names and shapes alone."""
    want = "flux" if model == "flux" else "sd3"
    path = D.save(_real_file(model, style), tmp_path / f"{model}-{style}.safetensors")
    net = load_network(path)
    assert net.base_model == want, (net.base_model, net.base_model_reason)
    assert base_model_of_file(path)[0] == want, base_model_of_file(path)


@pytest.mark.parametrize("name,metadata", [
    ("flux", {"ss_base_model_version": "flux1"}),
    ("flux", {"modelspec.architecture": "flux-1-dev/lora"}),
    ("sd3", {"ss_base_model_version": "sd3"}),
    ("sd3", {"modelspec.architecture": "stable-diffusion-3-medium/lora"}),
], ids=["flux-kohya-md", "flux-modelspec", "sd3-kohya-md", "sd3-modelspec"])
def test_base_model_from_metadata(tmp_path, name, metadata):
    """Metadata wins over keys: an OneTrainer-style file at a width that keys alone cannot tell."""
    sd = D.kohya_file({"transformer_blocks.0.attn.to_q": (16, 16)}, seed=1, prefix="lora_transformer_")
    path = D.save(sd, tmp_path / "m.safetensors", metadata)
    assert load_network(path).base_model == name, load_network(path).base_model_reason
    assert base_model_of_file(path)[0] == name


def _variant_file(tmp_path, case: str):
    sd = _real_file("flux", "kohya")
    md = None
    if case == "guidance-keys":     # a trained guidance embedder: only Flux dev has one
        _lora(sd, "lora_unet_guidance_in_in_layer", REAL_WIDTH["flux"], 256, "kohya")
    elif case.startswith("modelspec-"):
        md = {"modelspec.architecture": f"flux-1-{case.split('-')[1]}/lora"}
    return D.save(sd, tmp_path / f"{case}.safetensors", md)


VARIANTS = [("guidance-keys", "dev"), ("modelspec-dev", "dev"), ("modelspec-schnell", "schnell"), ("nothing", None)]


@pytest.mark.parametrize("case,variant", VARIANTS, ids=[c for c, _ in VARIANTS])
def test_flux_variant(tmp_path, case, variant):
    """dev vs schnell only where the file says so (guidance-embedder keys, ModelSpec architecture)."""
    net = load_network(_variant_file(tmp_path, case))
    assert net.base_model == "flux"
    assert flux_variant(net.metadata, net.modules) == variant


@pytest.mark.parametrize("case,variant", [
    pytest.param("sd3", None, id="sd3"),
    *[pytest.param(c, v, id=f"flux-{c}") for c, v in VARIANTS]])
def test_inspect_json_reports_base_model_and_variant(tmp_path, case, variant):
    """`python -m lib_lycoris inspect FILE --json` (and `describe`) carry the base model and the Flux variant."""
    if case == "sd3":
        path, want = D.save(_real_file("sd3", "kohya"), tmp_path / "sd3.safetensors"), "sd3"
    else:
        path, want = _variant_file(tmp_path, case), "flux"
    info = _inspect_json(path)
    assert info["base_model"] == want
    assert info.get("variant") == variant, info
    assert describe(load_network(path)) == info
