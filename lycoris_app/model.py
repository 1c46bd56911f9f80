"""Models the app generates with: the embedded default and a user's single-file checkpoint.

`Model` holds the diffusers components (UNet, text encoders with their tokenizers, VAE, scheduler config)
under one root module whose children are named like a diffusers pipeline (`unet`, `text_encoder`,
`text_encoder_2`), which is the layout `lib_lycoris.modelmap` knows, so `Patcher(model.root)` works.

The default model has the real SD1 architecture (4-level UNet with cross-attention on the first three,
CLIP text model with the real 49408-token vocabulary, 4-level VAE) at toy widths, with weights drawn
from a fixed seed: it draws noise-like images, but every network feature works on it and a 64×64,
4-step image takes a fraction of a second on a CPU.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .tokenizer import EOS, clip_tokenizer

log = logging.getLogger("lycoris_app")

DEFAULT_NAME = "lycoris-tiny-sd1"
DEFAULT_SEED = 20240601
# VAE latent scale of SD1/SD2 (ldm configs `scale_factor`); SDXL uses 0.13025.
SD_SCALE = 0.18215
SDXL_SCALE = 0.13025
CONFIG_DIR = Path(__file__).parent / "configs"

# Default model widths: small enough for well under a second per 64×64 image on CPU.
TINY_TE_HIDDEN = 64
TINY_TE_LAYERS = 2
TINY_UNET_CHANNELS = (32, 64, 64, 64)
TINY_VAE_CHANNELS = (16, 16, 32, 32)

# The SD1/SD2 noise schedule (ldm `linear_start`, `linear_end`, scaled_linear), shared by SDXL.
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "steps_offset": 1, "timestep_spacing": "leading", "prediction_type": "epsilon", "clip_sample": False,
    "set_alpha_to_one": False,
}


@dataclass
class TextEncoder:
    model: nn.Module
    tokenizer: object
    penultimate: bool = False     # SDXL takes the penultimate hidden state
    pooled: bool = False          # SDXL te2: the projected pooled output is an added condition


@dataclass
class Model:
    name: str
    arch: str                     # 'sd1' | 'sd2' | 'sdxl'
    root: nn.Module               # children unet, text_encoder[, text_encoder_2], vae
    encoders: list
    scheduler_config: dict
    vae_scale: float
    embedded: bool = False
    short_hash: str = ""
    default_size: int = 64
    notes: list = field(default_factory=list)

    @property
    def unet(self) -> nn.Module:
        return self.root.unet

    @property
    def vae(self) -> nn.Module:
        return self.root.vae

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def patch_root(self) -> nn.Module:
        """The module tree the Patcher sees: the UNet and text encoders (not the VAE)."""
        root = nn.Module()
        root.add_module("unet", self.root.unet)
        for i, enc in enumerate(self.encoders):
            root.add_module("text_encoder" if i == 0 else f"text_encoder_{i + 1}", enc.model)
        return root

    @torch.no_grad()
    def encode(self, texts: list) -> tuple:
        """(hidden states (B, 77, ctx), pooled (B, proj) or None) for the prompts `texts`."""
        hidden, pooled = [], None
        for enc in self.encoders:
            ids = enc.tokenizer(texts, padding="max_length", max_length=enc.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt").input_ids.to(self.device)
            out = enc.model(ids, output_hidden_states=enc.penultimate)
            hidden.append(out.hidden_states[-2] if enc.penultimate else out.last_hidden_state)
            if enc.pooled:
                pooled = out.text_embeds
        return torch.cat(hidden, dim=-1).to(self.dtype), pooled


def _randomize(module: nn.Module, gen: torch.Generator) -> None:
    """Seeded weights: fan-in scaled normals (std 1/√fan_in) so activations stay O(1) at any depth;
    norm scales 1, biases small; embeddings 0.5·N (an untrained model that still reacts to every token)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if p.ndim >= 2 and "embedding" not in name:
                p.copy_(noise / math.sqrt(p[0].numel()))
            elif p.ndim >= 2:
                p.copy_(noise * 0.5)
            elif name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.05 * noise)


def _state_hash(modules: list) -> str:
    h = hashlib.sha256()
    for m in modules:
        for k, v in m.state_dict().items():
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:10]


def build_default(data_dir: Optional[Path] = None, seed: int = DEFAULT_SEED) -> Model:
    """The embedded default model: real SD1 topology at toy widths, weights from `seed` (deterministic)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = clip_tokenizer(data_dir)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)   # module constructors draw their init from the global RNG; overwritten below
    te_cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=TINY_TE_HIDDEN, intermediate_size=2 * TINY_TE_HIDDEN,
                            num_hidden_layers=TINY_TE_LAYERS, num_attention_heads=4, max_position_embeddings=77,
                            hidden_act="quick_gelu", bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id)
    te = CLIPTextModel(te_cfg).eval()
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=8,
        block_out_channels=TINY_UNET_CHANNELS, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=TINY_TE_HIDDEN).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
                        block_out_channels=TINY_VAE_CHANNELS, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64).eval()
    for m in (te, unet, vae):
        _randomize(m, gen)
    root = nn.Module()
    root.add_module("unet", unet)
    root.add_module("text_encoder", te)
    root.add_module("vae", vae)
    root.requires_grad_(False)
    return Model(name=DEFAULT_NAME, arch="sd1", root=root, encoders=[TextEncoder(te, tok)],
                 scheduler_config=dict(SCHEDULER_CONFIG), vae_scale=SD_SCALE, embedded=True,
                 short_hash=_state_hash([unet, te, vae]), default_size=64,
                 notes=["embedded default model: random weights from a fixed seed, it draws noise-like images"])


# --------------------------------------------------------------------------------------------------
# Single-file checkpoints

def detect_checkpoint_arch(keys) -> str:
    """'sdxl' | 'sd2' | 'sd1' from the top-level key names of an original (LDM/SGM) checkpoint."""
    keys = list(keys)
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd1"
    raise ValueError("not an SD1.x/SD2.x/SDXL single-file checkpoint (no known text-encoder keys)")


def load_checkpoint(path: Path, data_dir: Optional[Path] = None, *, device: str = "cpu",
                    dtype: torch.dtype = torch.float32, v_prediction: Optional[bool] = None,
                    config_dir: Optional[Path] = None, **components) -> Model:
    """A user's single-file checkpoint, loaded offline with the shipped configs (`configs/<arch>/`).

    Args:
        v_prediction: None = as the config says (SD2: v-prediction, the 768-v models; others epsilon).
        config_dir: a diffusers config folder to use instead of the shipped one for the detected arch.
        components: ready components passed on to `from_single_file` (e.g. `vae=`), not read from the file.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from safetensors import safe_open

    path = Path(path)
    with safe_open(str(path), "pt") as f:
        arch = detect_checkpoint_arch(f.keys())
    cfg = Path(config_dir) if config_dir is not None else CONFIG_DIR / arch
    # OpenCLIP text towers (SD2, SDXL te2) pad with '!' (id 0); OpenAI CLIP (SD1, SDXL te1) with <|endoftext|>.
    tok1 = clip_tokenizer(data_dir, pad_token="!" if arch == "sd2" else EOS)
    kw = dict(config=str(cfg), local_files_only=True, torch_dtype=dtype, **components)
    if arch == "sdxl":
        tok2 = clip_tokenizer(data_dir, pad_token="!")
        pipe = StableDiffusionXLPipeline.from_single_file(str(path), tokenizer=tok1, tokenizer_2=tok2, **kw)
        encoders = [TextEncoder(pipe.text_encoder, tok1, penultimate=True),
                    TextEncoder(pipe.text_encoder_2, tok2, penultimate=True, pooled=True)]
    else:
        pipe = StableDiffusionPipeline.from_single_file(str(path), tokenizer=tok1, safety_checker=None,
                                                        feature_extractor=None, requires_safety_checker=False, **kw)
        encoders = [TextEncoder(pipe.text_encoder, tok1)]
    root = nn.Module()
    root.add_module("unet", pipe.unet)
    for i, enc in enumerate(encoders):
        root.add_module("text_encoder" if i == 0 else f"text_encoder_{i + 1}", enc.model)
    root.add_module("vae", pipe.vae)
    root.requires_grad_(False)
    root.to(device)
    sched = json.loads((cfg / "scheduler" / "scheduler_config.json").read_text())
    if v_prediction is not None:
        sched["prediction_type"] = "v_prediction" if v_prediction else "epsilon"
    from lib_lycoris.files import addnet_hash   # the same short file hash A1111 shows as `Model hash`
    return Model(name=path.stem, arch=arch, root=root, encoders=encoders, scheduler_config=sched,
                 vae_scale=pipe.vae.config.scaling_factor, short_hash=addnet_hash(path)[:10],
                 default_size=1024 if arch == "sdxl" else 768 if arch == "sd2" else 512)
