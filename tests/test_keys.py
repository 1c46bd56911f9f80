"""Every key style of the same network gives the same weights (kohya, diffusers/PEFT spellings,
ComfyUI `diffusion_model.`, `lora_te1_` on SD1, text encoders without `text_model_`, old attention
processors). Variants are made by renaming the keys of one official-code file; the names of the
dotted variants come from the fixture's own module trees, not from the engine."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from fixtures import oracle as O
from fixtures.models import tiny_model
from lib_lycoris.keys import parse_key
from lib_lycoris.network import load_network
from lib_lycoris.patcher import Patcher, Strength


def _merged(path, arch="sd1", layout="root") -> dict:
    tm = tiny_model(arch, 0)
    root = tm.root if layout == "root" else tm.diffusers
    stats = Patcher(root).apply([(load_network(path), Strength(1.0))])
    r = stats.reports[0]
    assert not r.unmatched and not r.skipped and not r.unknown_keys, r.summary()
    return {k: v.detach().clone() for k, v in root.named_parameters()}


def _dotted_names(module: torch.nn.Module) -> dict:
    """underscore name -> dotted module path, from the fixture's own module tree."""
    return {n.replace(".", "_"): n for n, _ in module.named_modules() if n}


def _rename(src, dst, fn):
    sd = load_file(str(src))
    save_file({fn(k): v for k, v in sd.items()}, str(dst))
    return dst


@pytest.fixture(scope="module")
def sd1_file():
    return O.oracle("sd1-lora", 1.0).path


@pytest.fixture(scope="module")
def sd1_reference(sd1_file):
    return _merged(sd1_file)


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_sd1_te1_prefix_and_no_text_model_level(tmp_path, sd1_file, sd1_reference):
    p = _rename(sd1_file, tmp_path / "te1.safetensors",
                lambda k: k.replace("lora_te_text_model_", "lora_te1_"))
    _same(_merged(p), sd1_reference)


def test_diffusers_dotted_keys_with_lora_linear_layer_and_lora_dot_down(tmp_path, sd1_file, sd1_reference):
    tm = tiny_model("sd1", 0)
    unet = _dotted_names(tm.unet)
    te = _dotted_names(tm.text_encoders[0])
    styles = iter(["lora_linear_layer.{}.weight", "lora.{}.weight"] * 10000)

    def fn(k):
        module, suffix = k.split(".", 1)
        if suffix == "alpha":
            return None
        style = next(styles)
        ud = "down" if suffix.startswith("lora_down") else "up"
        if module.startswith("lora_unet_"):
            return f"unet.{unet[module[len('lora_unet_'):]]}." + style.format(ud)
        body = module[len("lora_te_text_model_"):]
        return f"text_encoder.text_model.{te[body]}." + style.format(ud)
    sd = load_file(str(sd1_file))
    # these spellings carry no alpha: fold alpha/r into `up` so the weights must come out equal
    out = {}
    for k, v in sd.items():
        module, suffix = k.split(".", 1)
        if suffix == "lora_up.weight":
            alpha = sd[f"{module}.alpha"].float()
            v = v * (alpha / sd[f"{module}.lora_down.weight"].shape[0])
        name = fn(k)
        if name:
            out[name] = v
    p = tmp_path / "dotted.safetensors"
    save_file(out, str(p))
    got = _merged(p)
    for k in sd1_reference:
        torch.testing.assert_close(got[k], sd1_reference[k], rtol=1e-5, atol=1e-6)


def test_comfyui_diffusion_model_keys_on_sdxl(tmp_path):
    on = O.oracle("sdxl-lora", 1.0)
    tm = tiny_model("sdxl", 0)
    ldm = _dotted_names(tm.unet_view)

    def fn(k):
        module, suffix = k.split(".", 1)
        if module.startswith("lora_unet_"):
            return f"diffusion_model.{ldm[module[len('lora_unet_'):]]}.{suffix}"
        return k
    p = _rename(on.path, tmp_path / "comfy.safetensors", fn)
    _same(_merged(p, "sdxl"), _merged(on.path, "sdxl"))


def test_old_attention_processor_keys():
    k = parse_key("unet.down_blocks.0.attentions.1.transformer_blocks.0.attn2.processor.to_out_lora.down.weight")
    assert k.component == "unet" and k.suffix == "lora_down.weight"
    assert k.body == "down_blocks_0_attentions_1_transformer_blocks_0_attn2_to_out_0"


@pytest.mark.parametrize("key,component,body,suffix", [
    ("lora_unet_input_blocks_4_1_proj_in.lora_down.weight", "unet", "input_blocks_4_1_proj_in", "lora_down.weight"),
    ("lora_te2_text_model_encoder_layers_0_mlp_fc1.hada_w1_a", "te2", "text_model_encoder_layers_0_mlp_fc1", "hada_w1_a"),
    ("lycoris_down_blocks_0_resnets_0_conv1.lokr_w1", "unet", "down_blocks_0_resnets_0_conv1", "lokr_w1"),
    ("text_encoder_2.text_model.encoder.layers.1.self_attn.q_proj.lora_B.weight", "te2",
     "text_model_encoder_layers_1_self_attn_q_proj", "lora_up.weight"),
    ("base_model.model.down_blocks.0.attentions.0.proj_in.lora_A.weight", "unet",
     "down_blocks_0_attentions_0_proj_in", "lora_down.weight"),
    ("unet.mid_block.attentions.0.proj_out.lora_magnitude_vector", "unet", "mid_block_attentions_0_proj_out",
     "dora_scale"),
    ("lora_unet_conv_in.diff_b", "unet", "conv_in", "diff_b"),
])
def test_key_table(key, component, body, suffix):
    k = parse_key(key)
    assert (k.component, k.body, k.suffix) == (component, body, suffix)


@pytest.mark.parametrize("key", ["junk", "bundle_emb.x.string_to_param.*", "lora_unet_.alpha", "unet.lora_A.weight"])
def test_not_module_keys(key):
    assert parse_key(key) is None
