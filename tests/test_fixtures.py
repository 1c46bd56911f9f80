"""Self-checks of the test fixtures (tests/fixtures): the oracles must be right before they judge the engine.

* the LDM/SGM view's state dict converts back to the diffusers state dict with diffusers' own converter;
* the OpenCLIP copies compute the same function as the HF text encoders;
* every oracle network changes every parameter it lists, and the m = 1 reference differs from the base;
* the forward readout agrees with the textbook LoRA formula on a plain LoRA file (guards the readout).
"""
from __future__ import annotations

import logging

import pytest
import torch

from fixtures import models as M
from fixtures import oracle as O

logging.getLogger("lycoris").setLevel(logging.ERROR)


@pytest.mark.parametrize("arch", M.ARCHS)
def test_ldm_view_round_trips_through_diffusers_converter(arch):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    tm = M.tiny_model(arch)
    ldm_sd = {M.ORIGINAL_UNET_PREFIX + k: v for k, v in tm.unet_view.state_dict().items()}
    converted = convert_ldm_unet_checkpoint(ldm_sd, tm.unet.config)
    expected = tm.unet.state_dict()
    assert set(converted) == set(expected)
    for k, v in expected.items():
        assert converted[k].data_ptr() == v.data_ptr(), k  # the very same storage: shared leaves


@pytest.mark.parametrize("arch", M.ARCHS)
def test_original_root_shares_unet_and_has_real_names(arch):
    tm = M.tiny_model(arch)
    names = dict(tm.root.named_parameters())
    want = {
        "sd1": ["model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight",
                "model.diffusion_model.input_blocks.1.0.in_layers.2.weight",
                "model.diffusion_model.input_blocks.3.0.op.weight",
                "model.diffusion_model.output_blocks.2.1.conv.weight",
                "model.diffusion_model.output_blocks.5.2.conv.weight",
                "model.diffusion_model.middle_block.1.proj_in.weight",
                "model.diffusion_model.input_blocks.4.0.skip_connection.weight",
                "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"],
        "sd2": ["model.diffusion_model.input_blocks.4.1.proj_in.weight",
                "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight",
                "cond_stage_model.model.transformer.resblocks.1.mlp.c_fc.weight",
                "cond_stage_model.model.text_projection"],
        "sdxl": ["model.diffusion_model.input_blocks.7.1.transformer_blocks.2.attn2.to_k.weight",
                 "model.diffusion_model.output_blocks.2.2.conv.weight",
                 "model.diffusion_model.label_emb.0.2.weight",
                 "model.diffusion_model.time_embed.0.weight",
                 "model.diffusion_model.out.2.weight",
                 "model.diffusion_model.input_blocks.0.0.weight",
                 "conditioner.embedders.0.transformer.text_model.encoder.layers.1.mlp.fc2.weight",
                 "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight"],
    }[arch]
    for n in want:
        assert n in names, n
    assert names["model.diffusion_model.input_blocks.0.0.weight"] is tm.unet.conv_in.weight


@pytest.mark.parametrize("arch", ["sd2", "sdxl"])
def test_openclip_copy_computes_the_hf_function(arch):
    tm = M.tiny_model(arch)
    ids = M.te_input_ids()
    for te, oc in zip(tm.text_encoders, tm.te_openclip):
        if oc is None:
            continue
        with torch.no_grad():
            hf = te(ids).last_hidden_state
            ours = oc(ids)
        torch.testing.assert_close(ours, hf, rtol=1e-5, atol=1e-5)
        assert hf.abs().max() > 0.1  # non-vacuous


@pytest.mark.parametrize("arch", M.ARCHS)
def test_tiny_unet_forward_is_finite(arch):
    unet = M.tiny_unet(arch)
    with torch.no_grad():
        out = unet(**M.unet_inputs(arch)).sample
    assert out.isfinite().all() and out.abs().max() > 0


@pytest.mark.parametrize("case_id", O.CASE_IDS)
def test_oracle_network_changes_every_listed_param(case_id):
    on = O.oracle(case_id, 1.0)
    assert on.path.exists() and on.reference
    for k, ref in on.reference.items():
        base = on.base[k]
        assert ref.dtype == torch.float64 and ref.shape == base.shape, k
        assert not torch.equal(ref, base), k
        assert ref.isfinite().all(), k


@pytest.mark.parametrize("case_id", [c.id for c in O.LYCORIS_CASES])
def test_oracle_half_multiplier_differs(case_id):
    on1, on5 = O.oracle(case_id, 1.0), O.oracle(case_id, 0.5)
    assert set(on1.reference) == set(on5.reference)
    assert any(not torch.allclose(on1.reference[k], on5.reference[k]) for k in on1.reference)


def test_oracle_readout_matches_lora_formula():
    """Plain LoRA: W' = W + m·(alpha/r)·up@down from the file must equal the forward readout."""
    from safetensors.torch import load_file

    for m in O.MULTIPLIERS:
        on = O.oracle("sd1-lora", m)
        sd = load_file(str(on.path))
        tm = M.tiny_model("sd1")
        checked = 0
        for name, mod in tm.diffusers.named_modules():
            if not name.startswith("unet."):
                continue
            key = "lora_unet_" + name[len("unet."):].replace(".", "_")
            if f"{key}.lora_up.weight" not in sd:
                continue
            up = sd[f"{key}.lora_up.weight"].double()
            down = sd[f"{key}.lora_down.weight"].double()
            scale = sd[f"{key}.alpha"].item() / down.shape[0]
            delta = (up.flatten(1) @ down.flatten(1)).reshape(mod.weight.shape)
            want = mod.weight.double() + m * scale * delta
            torch.testing.assert_close(on.reference[f"{name}.weight"], want, rtol=1e-10, atol=1e-12)
            checked += 1
        assert checked > 50


@pytest.mark.parametrize("arch", M.ARCHS)
def test_to_original_key_names_exist(arch):
    case = {"sd1": "sd1-lora", "sd2": "sd2-lora", "sdxl": "sdxl-lora"}[arch]
    on = O.oracle(case, 1.0)
    tm = M.tiny_model(arch)
    params = dict(tm.root.named_parameters())
    diff = dict(tm.diffusers.named_parameters())
    for k, v in on.reference.items():
        name, rows = O.to_original_key(arch, k)
        assert name in params, (k, name)
        p = params[name] if rows is None else params[name][rows]
        torch.testing.assert_close(p.double(), diff[k].double(), rtol=0, atol=0)


def test_sdxl_kohya_file_uses_sgm_names():
    from safetensors.torch import load_file

    keys = {k.split(".")[0] for k in load_file(str(O.oracle("sdxl-lora").path))}
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in keys
    assert "lora_unet_output_blocks_2_2_conv" in keys and "lora_unet_label_emb_0_0" in keys
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in keys
    assert "lora_te2_text_model_encoder_layers_1_mlp_fc2" in keys
    assert not any(k.startswith("lora_unet_down_blocks") for k in keys)
