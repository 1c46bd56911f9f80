"""Block maps (LDM/SGM and diffusers paths, SD1/SD2/SDXL) and LBW lists/presets."""
from __future__ import annotations

import pytest

from lib_lycoris.blocks import (BLOCK_IDS_12, BLOCK_IDS_17, BLOCK_IDS_20, BLOCK_IDS_26, BlockMapError,
                                BlockWeightError, arch_block_ids, block_id, builtin_presets, coarse_block,
                                expand_lbw, load_presets, load_user_presets, parse_lbw, parse_presets)

# (arch, path, block) -- research/syntax_features.md §3.3 tables
PATHS = [
    # SD1/SD2, LDM
    ("sd1", "input_blocks.0.0", "IN00"),
    ("sd1", "input_blocks.1.1.transformer_blocks.0.attn1.to_q", "IN01"),
    ("sd1", "input_blocks.2.0.in_layers.2", "IN02"),
    ("sd1", "input_blocks.3.0.op", "IN03"),
    ("sd1", "input_blocks.4.1.proj_in", "IN04"),
    ("sd1", "input_blocks.10.0.out_layers.3", "IN10"),
    ("sd1", "input_blocks.11.0.emb_layers.1", "IN11"),
    ("sd1", "middle_block.0.in_layers.2", "M00"),
    ("sd1", "middle_block.1.proj_in", "M00"),
    ("sd1", "middle_block.2.skip_connection", "M00"),
    ("sd1", "output_blocks.0.0.in_layers.2", "OUT00"),
    ("sd1", "output_blocks.2.1.conv", "OUT02"),
    ("sd1", "output_blocks.5.2.conv", "OUT05"),
    ("sd1", "output_blocks.11.1.transformer_blocks.0.ff.net.2", "OUT11"),
    ("sd2", "input_blocks.7.1.proj_out", "IN07"),
    ("sd1", "time_embed.0", None),
    ("sd1", "time_embed.2", None),
    ("sd1", "out.0", None),
    ("sd1", "out.2", None),
    # prefixes and '_' separators (A1111 compvis / kohya key bodies)
    ("sd1", "diffusion_model.input_blocks.4.1.proj_in", "IN04"),
    ("sd1", "diffusion_model_input_blocks_1_1_proj_in", "IN01"),
    ("sdxl", "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "IN04"),
    ("sd1", "diffusion_model_output_blocks_10_1_proj_out", "OUT10"),
    # SD1, diffusers
    ("sd1", "conv_in", "IN00"),
    ("sd1", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", "IN01"),
    ("sd1", "down_blocks.0.resnets.1.conv1", "IN02"),
    ("sd1", "down_blocks.0.downsamplers.0.conv", "IN03"),
    ("sd1", "down_blocks.1.attentions.1.proj_out", "IN05"),
    ("sd1", "down_blocks.2.downsamplers.0.conv", "IN09"),
    ("sd1", "down_blocks.3.resnets.0.conv2", "IN10"),
    ("sd1", "down_blocks.3.resnets.1.time_emb_proj", "IN11"),
    ("sd1", "mid_block.attentions.0.proj_in", "M00"),
    ("sd1", "mid_block.resnets.1.conv1", "M00"),
    ("sd1", "up_blocks.0.resnets.2.conv_shortcut", "OUT02"),
    ("sd1", "up_blocks.0.upsamplers.0.conv", "OUT02"),
    ("sd1", "up_blocks.1.attentions.0.proj_in", "OUT03"),
    ("sd1", "up_blocks.2.upsamplers.0.conv", "OUT08"),
    ("sd1", "up_blocks.3.attentions.2.transformer_blocks.0.attn1.to_out.0", "OUT11"),
    ("sd1", "unet.up_blocks_3_attentions_2_proj_out", "OUT11"),
    ("sd1", "time_embedding.linear_1", None),
    ("sd1", "conv_norm_out", None),
    ("sd1", "conv_out", None),
    # SDXL, SGM
    ("sdxl", "input_blocks.0.0", "IN00"),
    ("sdxl", "input_blocks.1.0.in_layers.2", "IN01"),
    ("sdxl", "input_blocks.4.1.transformer_blocks.1.attn2.to_v", "IN04"),
    ("sdxl", "input_blocks.8.1.transformer_blocks.9.ff.net.0.proj", "IN08"),
    ("sdxl", "middle_block.1.transformer_blocks.9.attn1.to_q", "M00"),
    ("sdxl", "output_blocks.2.2.conv", "OUT02"),
    ("sdxl", "output_blocks.5.2.conv", "OUT05"),
    ("sdxl", "output_blocks.8.0.skip_connection", "OUT08"),
    ("sdxl", "label_emb.0.0", None),
    ("sdxl", "label_emb.0.2", None),
    ("sdxl", "time_embed.0", None),
    ("sdxl", "out.2", None),
    # SDXL, diffusers
    ("sdxl", "down_blocks.2.attentions.1.transformer_blocks.9.attn1.to_k", "IN08"),
    ("sdxl", "down_blocks.1.downsamplers.0.conv", "IN06"),
    ("sdxl", "up_blocks.0.upsamplers.0.conv", "OUT02"),
    ("sdxl", "up_blocks.2.resnets.2.conv2", "OUT08"),
    ("sdxl", "add_embedding.linear_1", None),
]


@pytest.mark.parametrize("arch,path,expected", PATHS)
def test_block_id(arch: str, path: str, expected: str) -> None:
    assert block_id("unet", path, arch) == expected


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_text_encoders_are_base(arch: str) -> None:
    assert block_id("te1", None, arch) == "BASE"
    assert block_id("te2", "whatever", arch) == "BASE"


@pytest.mark.parametrize("arch,path", [
    ("sdxl", "input_blocks.9.0.op"), ("sdxl", "output_blocks.10.1.proj_in"), ("sdxl", "down_blocks.3.resnets.0"),
    ("sd1", "input_blocks.12.0"), ("sd1", "up_blocks.4.resnets.0"), ("sd1", "down_blocks.0.resnets.2"),
    ("sd1", "transformer.foo"), ("sd1", ""), ("sd1", "outside"),
])
def test_block_id_rejects(arch: str, path: str) -> None:
    with pytest.raises(BlockMapError):
        block_id("unet", path, arch)


def test_block_id_rejects_arch_and_component() -> None:
    with pytest.raises(BlockMapError):
        block_id("unet", "input_blocks.0.0", "flux")
    with pytest.raises(BlockMapError):
        block_id("vae", "input_blocks.0.0", "sd1")


@pytest.mark.parametrize("block,coarse", [("BASE", "te"), ("IN00", "in"), ("IN11", "in"), ("M00", "mid"),
                                          ("OUT05", "out"), (None, None)])
def test_coarse_block(block: str, coarse: str) -> None:
    assert coarse_block(block) == coarse


def _diffusers_unet_modules(arch: str) -> list[tuple[str, bool]]:
    """(module path, is attention-only LoRA target) of every Linear/Conv of a diffusers UNet built on 'meta'."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    if arch == "sdxl":
        config = dict(block_out_channels=(320, 640, 1280),
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                      transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
                      addition_embed_type="text_time", addition_time_embed_dim=256,
                      projection_class_embeddings_input_dim=2816, use_linear_projection=True)
    else:
        config = dict(cross_attention_dim=768)
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**config)
    out = []
    for name, module in unet.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            out.append((name, ".attentions." in name))
    return out


@pytest.mark.parametrize("arch,attn_ids,all_ids", [("sd1", BLOCK_IDS_17, BLOCK_IDS_26),
                                                   ("sdxl", BLOCK_IDS_12, BLOCK_IDS_20)])
def test_every_diffusers_module_maps(arch: str, attn_ids: tuple[str, ...], all_ids: tuple[str, ...]) -> None:
    modules = _diffusers_unet_modules(arch)
    seen, attn_seen, outside = set(), set(), set()
    for name, is_attn in modules:
        block = block_id("unet", name, arch)
        if block is None:
            outside.add(name.split(".")[0])
            continue
        seen.add(block)
        if is_attn:
            attn_seen.add(block)
    # every id of the architecture's full list has modules; attention modules fill exactly the short list
    assert seen == set(all_ids) - {"BASE"}
    assert attn_seen == set(attn_ids) - {"BASE"}
    expected_outside = {"time_embedding", "conv_out"} | ({"add_embedding"} if arch == "sdxl" else set())
    assert outside == expected_outside
    assert set(arch_block_ids(arch)) == set(all_ids)


def test_expand_lbw_orders() -> None:
    for n, ids in ((12, BLOCK_IDS_12), (17, BLOCK_IDS_17), (20, BLOCK_IDS_20), (26, BLOCK_IDS_26)):
        values = [float(i + 1) for i in range(n)]
        weights = expand_lbw(values)
        assert len(weights) == 26
        assert [weights[i] for i in ids] == values
        assert all(weights[i] == 0.0 for i in BLOCK_IDS_26 if i not in ids)
    with pytest.raises(BlockWeightError):
        expand_lbw([1.0] * 25)


def test_builtin_presets() -> None:
    presets = builtin_presets()
    assert {"NONE", "ALL", "INS", "IND", "INALL", "MIDD", "OUTD", "OUTS", "OUTALL", "ALL0.5"} <= set(presets)
    assert all(v == 1 for v in parse_lbw("ALL").as_dict().values())
    assert all(v == 0.5 for v in parse_lbw("ALL0.5").as_dict().values())
    ins = parse_lbw("INS").as_dict()
    assert [k for k, v in ins.items() if v == 1] == ["BASE", "IN01", "IN02", "IN04"]
    midd = parse_lbw("MIDD").as_dict()
    # LBW code (not the research summary): MIDD also has OUT06
    assert [k for k, v in midd.items() if v == 1] == ["BASE", "IN05", "IN07", "IN08", "M00", "OUT03", "OUT04",
                                                      "OUT05", "OUT06"]


def test_parse_lbw() -> None:
    bw = parse_lbw(" 1, 0.5 ," + ",".join(["0"] * 10))
    assert bw.text == "1,0.5," + ",".join(["0"] * 10)
    assert bw.get("BASE") == 1 and bw.get("IN04") == 0.5 and bw.get("IN00") == 0 and bw.get("nope") == 1
    assert parse_lbw("outd").text == "OUTD"
    for bad in ("", "NOPE", "1,2,3", "1,x," + ",".join(["1"] * 10), "R," + ",".join(["1"] * 11)):
        with pytest.raises(BlockWeightError):
            parse_lbw(bad)
    assert parse_lbw("MINE", {"MINE": [2.0] * 12}).get("OUT05") == 2.0


def test_parse_presets_lines() -> None:
    text = "# comment\n\nA:" + ",".join(["1"] * 17) + "  # trailing\nB 1,2\nC:1,2,3\n:1\nD:" + \
        ",".join(["x"] * 12) + "\n"
    presets, warnings = parse_presets(text, "f")
    assert list(presets) == ["A"] and len(warnings) == 4
    assert all(w.startswith("f line ") for w in warnings)


def test_user_presets_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert load_presets(tmp_path / "missing.txt") == ({}, [])
    (tmp_path / "lbw_presets.txt").write_text("\ufeffALL:" + ",".join(["2"] * 26) + "\nMY:" +
                                              ",".join(["0.5"] * 20) + "\n", encoding="utf-8")
    presets, warnings = load_user_presets(tmp_path)
    assert not warnings
    assert presets["ALL"] == tuple([2.0] * 26)  # the user's preset wins
    assert "INS" in presets and len(presets["MY"]) == 20
