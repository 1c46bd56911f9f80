"""SD3 and Flux without a model: key parsing of every style, block ids, LBW lists, family detection from
keys, shapes and metadata, and the original <-> diffusers names of `dit` checked against diffusers' own
single-file converters (the correspondence comes from diffusers, not from us)."""
from __future__ import annotations

import pytest
import torch

from lib_lycoris import dit
from lib_lycoris.blocks import (BLOCK_IDS_FLUX, BlockWeightError, arch_block_ids, block_id, coarse_block,
                                parse_lbw)
from lib_lycoris.keys import parse_key
from lib_lycoris.modelmap import ModelMap
from lib_lycoris.network import base_model_from_metadata, detect_base_model, flux_variant, NetworkModule
from lib_lycoris.tags import parse_prompt

KEYS = [
    # (file key, component, body)
    ("lora_unet_joint_blocks_3_x_block_attn_qkv.lora_down.weight", "unet", "joint_blocks_3_x_block_attn_qkv"),
    ("lora_unet_double_blocks_0_img_attn_qkv.alpha", "unet", "double_blocks_0_img_attn_qkv"),
    ("lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight", "te3", "encoder_block_0_layer_0_SelfAttention_q"),
    ("lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight", "te1", "text_model_encoder_layers_0_mlp_fc1"),
    ("transformer.transformer_blocks.0.attn.to_q.lora_A.weight", "unet", "transformer_blocks_0_attn_to_q"),
    ("transformer.single_transformer_blocks.7.proj_mlp.lora_B.weight", "unet", "single_transformer_blocks_7_proj_mlp"),
    ("lora_transformer_transformer_blocks_0_attn_add_k_proj.lora_down.weight", "unet",
     "transformer_blocks_0_attn_add_k_proj"),
    ("lycoris_double_blocks_1_txt_mlp_0.hada_w1_a", "unet", "double_blocks_1_txt_mlp_0"),
    ("diffusion_model.single_blocks.2.linear1.lora_A.weight", "unet", "single_blocks_2_linear1"),
    ("double_blocks.4.processor.qkv_lora2.down.weight", "unet", "double_blocks_4_txt_attn_qkv"),
    ("double_blocks.4.processor.proj_lora1.up.weight", "unet", "double_blocks_4_img_attn_proj"),
    ("diffusion_model.single_blocks.1.processor.qkv_lora.up.weight", "unet", "single_blocks_1_linear1_qkv"),
    ("single_blocks.1.processor.proj_lora.down.weight", "unet", "single_blocks_1_linear2"),
    ("text_encoders.clip_g.transformer.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight", "te2",
     "text_model_encoder_layers_0_self_attn_q_proj"),
    ("clip_g_transformer_text_model_encoder_layers_0_mlp_fc1.lora_up.weight", "te2",      # A1111 SD3 layer names
     "text_model_encoder_layers_0_mlp_fc1"),
    ("clip_l_transformer_text_model_encoder_layers_3_self_attn_q_proj.alpha", "te1",
     "text_model_encoder_layers_3_self_attn_q_proj"),
    ("text_encoder_2.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight", "te3",
     "encoder_block_0_layer_0_SelfAttention_q"),
    ("text_encoder_3.encoder.block.1.layer.1.DenseReluDense.wi_0.lora_B.weight", "te3",
     "encoder_block_1_layer_1_DenseReluDense_wi_0"),
]


@pytest.mark.parametrize("key,comp,body", KEYS)
def test_parse_key_styles(key: str, comp: str, body: str) -> None:
    parts = parse_key(key)
    assert parts is not None and (parts.component, parts.body) == (comp, body)


def _sd3_native(depth: int = 3, h: int = 64, ctx: int = 32) -> dict:
    g = torch.Generator().manual_seed(0)
    sd = {"pos_embed": (1, 16, h), "x_embedder.proj.weight": (h, 4, 2, 2), "x_embedder.proj.bias": (h,),
          "context_embedder.weight": (h, ctx), "context_embedder.bias": (h,),
          "t_embedder.mlp.0.weight": (h, 256), "t_embedder.mlp.0.bias": (h,), "t_embedder.mlp.2.weight": (h, h),
          "t_embedder.mlp.2.bias": (h,), "y_embedder.mlp.0.weight": (h, ctx), "y_embedder.mlp.0.bias": (h,),
          "y_embedder.mlp.2.weight": (h, h), "y_embedder.mlp.2.bias": (h,),
          "final_layer.linear.weight": (16, h), "final_layer.linear.bias": (16,),
          "final_layer.adaLN_modulation.1.weight": (2 * h, h), "final_layer.adaLN_modulation.1.bias": (2 * h,)}
    for i in range(depth):
        last = i == depth - 1
        for blk in ("x_block", "context_block"):
            pre = f"joint_blocks.{i}.{blk}."
            pre_only = last and blk == "context_block"
            sd[pre + "attn.qkv.weight"], sd[pre + "attn.qkv.bias"] = (3 * h, h), (3 * h,)
            mods = 2 if pre_only else 6
            sd[pre + "adaLN_modulation.1.weight"], sd[pre + "adaLN_modulation.1.bias"] = (mods * h, h), (mods * h,)
            if not pre_only:
                sd[pre + "attn.proj.weight"], sd[pre + "attn.proj.bias"] = (h, h), (h,)
                sd[pre + "mlp.fc1.weight"], sd[pre + "mlp.fc1.bias"] = (4 * h, h), (4 * h,)
                sd[pre + "mlp.fc2.weight"], sd[pre + "mlp.fc2.bias"] = (h, 4 * h), (h,)
    return {k: torch.randn(s, generator=g) for k, s in sd.items()}


def _flux_native(double: int = 2, single: int = 2, h: int = 64, dtype: torch.dtype = torch.float32) -> dict:
    """BFL names; diffusers' converter fixes the width at 3072, so tests that run it use h=3072 with one
    block of each kind in float16 (0.5 B elements, 1 GB)."""
    g = torch.Generator().manual_seed(1)
    sd = {"img_in.weight": (h, 16), "img_in.bias": (h,), "txt_in.weight": (h, 32), "txt_in.bias": (h,),
          "time_in.in_layer.weight": (h, 256), "time_in.in_layer.bias": (h,), "time_in.out_layer.weight": (h, h),
          "time_in.out_layer.bias": (h,), "vector_in.in_layer.weight": (h, 24), "vector_in.in_layer.bias": (h,),
          "vector_in.out_layer.weight": (h, h), "vector_in.out_layer.bias": (h,),
          "guidance_in.in_layer.weight": (h, 256), "guidance_in.in_layer.bias": (h,),
          "guidance_in.out_layer.weight": (h, h), "guidance_in.out_layer.bias": (h,),
          "final_layer.linear.weight": (16, h), "final_layer.linear.bias": (16,),
          "final_layer.adaLN_modulation.1.weight": (2 * h, h), "final_layer.adaLN_modulation.1.bias": (2 * h,)}
    for i in range(double):
        for s in ("img", "txt"):
            pre = f"double_blocks.{i}.{s}_"
            for name, shape in (("mod.lin", (6 * h, h)), ("attn.qkv", (3 * h, h)), ("attn.proj", (h, h)),
                                ("mlp.0", (4 * h, h)), ("mlp.2", (h, 4 * h))):
                sd[pre + name + ".weight"], sd[pre + name + ".bias"] = shape, (shape[0],)
            sd[pre + "attn.norm.query_norm.scale"] = (8,)
            sd[pre + "attn.norm.key_norm.scale"] = (8,)
    for i in range(single):
        pre = f"single_blocks.{i}."
        for name, shape in (("linear1", (7 * h, h)), ("linear2", (h, 5 * h)), ("modulation.lin", (3 * h, h))):
            sd[pre + name + ".weight"], sd[pre + name + ".bias"] = shape, (shape[0],)
        sd[pre + "norm.query_norm.scale"] = (8,)
        sd[pre + "norm.key_norm.scale"] = (8,)
    return {k: torch.randn(s, generator=g, dtype=dtype) for k, s in sd.items()}


FLUX_WIDTH = 3072   # diffusers' convert_flux_transformer_checkpoint_to_diffusers: inner_dim = 3072


def _rows_of(mm: ModelMap, body: str) -> tuple:
    t = mm.lookup("unet", body)
    assert t is not None, body
    return t.weight, t.rows, t.swap


def test_sd3_original_layout_map() -> None:
    sd = {"model.diffusion_model." + k: v for k, v in _sd3_native().items()}
    mm = ModelMap.from_state_dict(sd)
    assert (mm.arch, mm.family, mm.depth, mm.styles["unet"]) == ("sd3", "sd3", 3, "native")
    w = "model.diffusion_model.joint_blocks.1.context_block.attn.qkv.weight"
    assert _rows_of(mm, "joint_blocks_1_context_block_attn_qkv") == (w, None, False)
    assert _rows_of(mm, "transformer_blocks_1_attn_add_k_proj") == (w, (64, 128), False)
    assert _rows_of(mm, "transformer_blocks_0_attn_to_v")[1] == (128, 192)
    assert _rows_of(mm, "transformer_blocks_0_ff_context_net_2")[0].endswith("joint_blocks.0.context_block.mlp.fc2.weight")
    # diffusers puts scale before shift where SAI puts shift before scale: the last context block and norm_out
    assert _rows_of(mm, "transformer_blocks_2_norm1_context_linear")[2] is True
    assert _rows_of(mm, "transformer_blocks_1_norm1_context_linear")[2] is False
    assert _rows_of(mm, "norm_out_linear") == ("model.diffusion_model.final_layer.adaLN_modulation.1.weight", None, True)
    assert mm.lookup("unet", "pos_embed_proj").weight.endswith("x_embedder.proj.weight")
    # each weight listed once
    assert len({t.weight for t in mm.targets}) == len(mm.targets)


def test_flux_original_layout_map_bare_and_comfy_prefix() -> None:
    for prefix in ("", "model.diffusion_model."):
        mm = ModelMap.from_state_dict({prefix + k: v for k, v in _flux_native().items()})
        assert (mm.arch, mm.depth, mm.singles) == ("flux", 2, 2)
        lin1 = prefix + "single_blocks.1.linear1.weight"
        assert _rows_of(mm, "single_transformer_blocks_1_attn_to_k") == (lin1, (64, 128), False)
        assert _rows_of(mm, "single_transformer_blocks_1_proj_mlp") == (lin1, (192, 448), False)
        assert _rows_of(mm, "single_blocks_1_linear1_qkv") == (lin1, (0, 192), False)
        assert _rows_of(mm, "transformer_blocks_0_attn_add_q_proj")[0] == prefix + "double_blocks.0.txt_attn.qkv.weight"
        assert _rows_of(mm, "transformer_blocks_0_norm1_context_linear")[0] == prefix + "double_blocks.0.txt_mod.lin.weight"
        assert _rows_of(mm, "time_text_embed_guidance_embedder_linear_2")[0] == prefix + "guidance_in.out_layer.weight"


def test_diffusers_layout_groups_split_a_fused_name() -> None:
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
    h = FLUX_WIDTH
    diff = convert_flux_transformer_checkpoint_to_diffusers(_flux_native(1, 1, h, torch.float16))
    mm = ModelMap.from_state_dict({"transformer." + k: v for k, v in diff.items()})
    assert (mm.arch, mm.styles["unet"]) == ("flux", "diffusers")
    group = mm.lookup_group("unet", "single_blocks_0_linear1")
    assert [(t.module.rsplit(".", 1)[-1], rows) for t, rows in group] == [
        ("to_q", (0, h)), ("to_k", (h, 2 * h)), ("to_v", (2 * h, 3 * h)), ("proj_mlp", (3 * h, 7 * h))]
    assert [rows for _, rows in mm.lookup_group("unet", "double_blocks_0_img_attn_qkv")] == \
        [(0, h), (h, 2 * h), (2 * h, 3 * h)]
    t = mm.lookup("unet", "final_layer_adaLN_modulation_1")
    assert t.weight == "transformer.norm_out.linear.weight" and t.swap


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_every_converted_weight_has_its_original_name(family: str) -> None:
    """Against diffusers' single-file converter: each original weight W and the diffusers weights made from it
    answer to one name each way, with the rows (and swapped halves) the converter put them in."""
    from diffusers.loaders import single_file_utils as S
    native = _sd3_native() if family == "sd3" else _flux_native(1, 1, FLUX_WIDTH, torch.float16)
    convert = S.convert_sd3_transformer_checkpoint_to_diffusers if family == "sd3" else \
        S.convert_flux_transformer_checkpoint_to_diffusers
    diff = convert({k: v.clone() for k, v in native.items()})
    mm_native = ModelMap.from_state_dict(native)
    checked = 0
    for name, value in diff.items():
        if not name.endswith(".weight") or value.dim() < 2:
            continue
        body = name[: -len(".weight")].replace(".", "_")
        t = mm_native.lookup("unet", body)
        assert t is not None, f"{name} has no name in the original layout"
        w = native[t.weight]
        if t.rows is not None:
            w = w[t.rows[0]:t.rows[1]]
        if t.swap:
            half = w.shape[0] // 2
            w = torch.cat([w[half:], w[:half]])
        assert torch.equal(w.reshape(value.shape), value), name
        checked += 1
    assert checked > 20


def test_block_ids_of_transformers() -> None:
    assert block_id("te1", None, "flux") == "CLIP" and block_id("te3", None, "sd3") == "T5"
    assert block_id("te2", None, "sdxl") == "BASE"
    assert (block_id("unet", "double_blocks.18.img_attn.qkv", "flux"), coarse_block(block_id("unet", "double_blocks.18.x", "flux"))) == ("D18", "in")
    assert [coarse_block(block_id("unet", f"single_blocks.{i}.linear1", "flux")) for i in (0, 18, 19, 37)] == \
        ["mid", "mid", "out", "out"]
    assert [coarse_block(block_id("unet", f"joint_blocks.{i}.x_block.attn.qkv", "sd3", (24, 0))) for i in (0, 7, 8, 15, 16, 23)] == \
        ["in", "in", "mid", "mid", "out", "out"]
    assert [coarse_block(block_id("unet", f"joint_blocks.{i}.x", "sd3", (38, 0))) for i in (12, 13, 24, 25)] == \
        ["in", "mid", "mid", "out"]
    assert block_id("unet", "img_in", "flux") == "IN" and block_id("unet", "final_layer.linear", "sd3") == "OUT"
    assert len(arch_block_ids("flux")) == 61 and arch_block_ids("sd3", 24)[:4] == ("CLIP", "T5", "IN", "D00")


def test_flux_lbw_list_weights_blocks_and_text_encoders() -> None:
    values = [0.0] * 61
    values[BLOCK_IDS_FLUX.index("CLIP")] = 0.5
    values[BLOCK_IDS_FLUX.index("D03")] = 0.25
    values[BLOCK_IDS_FLUX.index("S20")] = 2.0
    bw = parse_lbw(",".join(str(v) for v in values))
    assert bw.fits("flux") and not bw.fits("sd1") and not parse_lbw("ALL").fits("flux")
    (req,) = parse_prompt(f"<lora:x:1:lbw={','.join(str(v) for v in values)}>").requests
    assert req.weight("te1", "CLIP", 1, 10) == 0.5 and req.weight("te3", "T5", 1, 10) == 0.0
    assert req.weight("unet", block_id("unet", "double_blocks.3.img_mlp.0", "flux"), 1, 10) == 0.25
    assert req.weight("unet", block_id("unet", "single_blocks.20.linear2", "flux"), 1, 10) == 2.0
    assert req.weight("unet", block_id("unet", "single_blocks.2.linear2", "flux"), 1, 10) == 0.0
    with pytest.raises(BlockWeightError):
        parse_lbw(",".join(["1"] * 30))


def test_in_mid_out_on_flux() -> None:
    (req,) = parse_prompt("<lora:x:1:in=0.5:mid=0:out=2>").requests
    ids = {p: block_id("unet", p, "flux") for p in ("img_in", "double_blocks.0.img_attn.qkv", "single_blocks.5.linear1",
                                                     "single_blocks.30.linear1", "final_layer.linear")}
    assert [req.weight("unet", b, 1, 10) for b in ids.values()] == [0.5, 0.5, 0.0, 2.0, 2.0]


@pytest.mark.parametrize("md,expected", [
    ({"ss_base_model_version": "flux1"}, "flux"),
    ({"modelspec.architecture": "flux-1-dev/lora"}, "flux"),
    ({"ss_base_model_version": "sd3"}, "sd3"),
    ({"modelspec.architecture": "stable-diffusion-3.5-large/lora"}, "sd3"),
    ({"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}, "sdxl"),
])
def test_base_model_from_metadata(md: dict, expected: str) -> None:
    assert base_model_from_metadata(md)[0] == expected


def _module(comp: str, body: str, out: int = 8, inp: int = 8) -> NetworkModule:
    from lib_lycoris.algorithms.lora import LoRA
    return NetworkModule(component=comp, body=body, path=body, adapter=LoRA(up=torch.zeros(out, 2), down=torch.zeros(2, inp)),
                         scale=1.0, dora_scale=None, bias_delta=None, keys=())


@pytest.mark.parametrize("bodies,expected", [
    ([("unet", "double_blocks_0_img_attn_qkv")], "flux"),
    ([("unet", "single_transformer_blocks_3_proj_mlp")], "flux"),
    ([("unet", "joint_blocks_0_context_block_attn_proj")], "sd3"),
    ([("unet", "transformer_blocks_23_attn_to_q")], "sd3"),      # Flux has 19 double blocks
    ([("te1", "text_model_encoder_layers_0_mlp_fc1"), ("te3", "encoder_block_0_layer_0_SelfAttention_q")], "flux"),
    ([("te2", "text_model_encoder_layers_0_mlp_fc1"), ("te3", "encoder_block_0_layer_0_SelfAttention_q")], "sd3"),
])
def test_family_from_keys(bodies: list, expected: str) -> None:
    mods = {(c, b): _module(c, b) for c, b in bodies}
    assert detect_base_model({}, mods)[0] == expected


def test_family_from_width_of_shared_diffusers_names() -> None:
    assert detect_base_model({}, {("unet", "b"): _module("unet", "transformer_blocks_0_attn_to_q", 3072, 3072)})[0] == "flux"
    assert detect_base_model({}, {("unet", "b"): _module("unet", "transformer_blocks_0_attn_to_q", 1536, 1536)})[0] == "sd3"


def test_flux_variant() -> None:
    assert flux_variant({"modelspec.architecture": "flux-1-schnell/lora"}, {}) == "schnell"
    assert flux_variant({}, {("unet", "g"): _module("unet", "guidance_in_in_layer")}) == "dev"
    assert flux_variant({}, {("unet", "d"): _module("unet", "double_blocks_0_img_attn_qkv")}) is None


def test_dit_family_markers() -> None:
    assert dit.family_of(["joint_blocks.0.x_block.attn.qkv"]) == "sd3"
    assert dit.family_of(["transformer_blocks.0.attn.add_q_proj", "single_transformer_blocks.0.proj_mlp"]) == "flux"
    assert dit.family_of(["input_blocks.0.0"]) is None


def test_flux_control_lora_refused_with_a_clear_message(tmp_path) -> None:
    """BFL control LoRAs (norm scales replaced, lora_B biases, a widened img_in) are refused by name."""
    from safetensors.torch import save_file
    from lib_lycoris.errors import NetworkFileError
    from lib_lycoris.network import load_network
    sd = {"img_in.lora_A.weight": torch.zeros(4, 128), "img_in.lora_B.weight": torch.zeros(64, 4),
          "img_in.lora_B.bias": torch.zeros(64), "double_blocks.0.img_attn.norm.query_norm.scale": torch.ones(8)}
    save_file(sd, str(tmp_path / "canny.safetensors"))
    with pytest.raises(NetworkFileError, match="Flux control LoRA") as e:
        load_network(tmp_path / "canny.safetensors")
    assert "canny.safetensors" in str(e.value)
