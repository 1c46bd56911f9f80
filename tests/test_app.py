"""The standalone host end to end: the CLI on the embedded default model, and the app's parts in-process.

The CLI runs as a user would run it (`python -m lycoris_app generate ...`) in a temporary data dir; several
prompts go through one process, so "removing the tag gives the original bits back" checks the Patcher's
restore inside a live host, and a second process checks that the default model is deterministic.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from PIL import Image  # noqa: E402
from synth import kohya_modules  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LORA = "inkwash_lora"


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _cli(*args: str, data_dir: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "lycoris_app", *args, "--data-dir", str(data_dir)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lycoris_app")


@pytest.fixture(scope="module")
def cli_run(data_dir, tmp_path_factory):
    """One CLI process, six prompts: base, tag, base again, schedule, its two constant parts, bad tags."""
    out = tmp_path_factory.mktemp("out") / "img.png"
    prompts = [
        "a red cat",
        f"a red cat <lora:{LORA}:1>",
        "a red cat",
        f"a red cat <lora:{LORA}:0@1,1@3>",     # 0 for steps 1-2, 1 for steps 3-4
        f"a red cat <lora:{LORA}:0>",
        "a red cat <lora:no_such_network:1> <lora:moss_loha:1:lbw=1,2>",
    ]
    r = _cli("generate", *prompts, "--steps", "4", "--seed", "7", "-o", str(out), "--json", data_dir=data_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == len(prompts)
    return prompts, rows, r.stderr


def test_cli_tag_changes_image_and_removing_it_restores_the_bits(cli_run):
    _, rows, _ = cli_run
    base, tagged, again = (_pixels(Path(rows[i]["output"])) for i in range(3))
    assert base.shape == (64, 64, 3)
    assert np.abs(tagged.astype(int) - base.astype(int)).mean() > 1.0, "the network did not change the image"
    assert np.array_equal(again, base), "the model was not restored after the tagged image"
    assert Path(rows[0]["output"]).read_bytes() == Path(rows[2]["output"]).read_bytes()


def test_cli_infotext_has_lora_hashes(cli_run, data_dir):
    from lib_lycoris.files import addnet_hash

    _, rows, _ = cli_run
    info = rows[1]["infotext"]
    h = addnet_hash(data_dir / "networks" / f"{LORA}.safetensors")[:12]
    assert f'Lora hashes: "{LORA}: {h}"' in info
    assert "Steps: 4" in info and "Seed: 7" in info and "Size: 64x64" in info
    assert "Lora hashes" not in rows[0]["infotext"]
    png = Image.open(rows[1]["output"])
    assert png.text["parameters"] == info           # the WebUI's PNG text chunk


def test_cli_schedule_differs_from_its_constant_parts(cli_run):
    _, rows, _ = cli_run
    base, full, sched, zero = (_pixels(Path(rows[i]["output"])) for i in (0, 1, 3, 4))
    assert rows[3]["weights"][LORA]["unet"] == [0.0, 0.0, 1.0, 1.0]
    assert not np.array_equal(sched, full)
    assert not np.array_equal(sched, base)
    assert np.array_equal(zero, base), "weight 0 must switch the network off exactly"


def test_cli_bad_tags_warn_and_still_give_an_image(cli_run):
    _, rows, stderr = cli_run
    warnings = rows[5]["warnings"]
    assert any("no_such_network" in w for w in warnings), warnings
    assert any("lbw" in w for w in warnings), warnings
    assert "warning: <lora:no_such_network" in stderr
    assert _pixels(Path(rows[5]["output"])).shape == (64, 64, 3)
    assert "moss_loha" in rows[5]["infotext"]        # the good tag of the same prompt still applied


def test_cli_is_deterministic_across_processes(cli_run, data_dir, tmp_path):
    _, rows, _ = cli_run
    out = tmp_path / "again.png"
    r = _cli("generate", f"a red cat <lora:{LORA}:1>", "--steps", "4", "--seed", "7", "-o", str(out),
             "--no-progress", data_dir=data_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    assert out.read_bytes() == Path(rows[1]["output"]).read_bytes()


def test_cli_networks_lists_the_examples(cli_run, data_dir):
    r = _cli("networks", "--json", data_dir=data_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    cards = {c["name"]: c for c in json.loads(r.stdout)}
    assert set(cards) >= {"inkwash_lora", "moss_loha", "brass_lokr", "glass_oft"}
    assert cards["moss_loha"]["algos"] == {"loha": cards["moss_loha"]["modules"]}
    assert cards["glass_oft"]["trigger_words"] == ["stained glass"]
    assert all(c["base_model"] == "sd1" and c["preview"] and c["error"] is None for c in cards.values())


def test_cli_bad_option_exits_2(data_dir):
    r = _cli("generate", "x", "--steps", "0", "-o", "/dev/null", data_dir=data_dir)
    assert r.returncode == 2 and "steps" in r.stderr


# --------------------------------------------------------------------------------------------------
# In-process: te segments, hires pass, bypass mode, tokenizer, single-file checkpoints

@pytest.fixture(scope="module")
def session(data_dir, cli_run):
    from lycoris_app.app import AppConfig, open_session

    return open_session(AppConfig(data_dir=data_dir))


def _gen(session, prompt: str, **kw) -> np.ndarray:
    from lycoris_app.sampling import GenParams

    r = session.generate(GenParams(prompt, steps=4, seed=3, **kw))
    return np.asarray(r.image)


def test_te_schedule_encodes_per_segment(session):
    const0 = _gen(session, f"a dog <lora:{LORA}:te=0:unet=0>")
    const1 = _gen(session, f"a dog <lora:{LORA}:te=1:unet=0>")
    sched = _gen(session, f"a dog <lora:{LORA}:te=0@1,1@3:unet=0>")
    assert not np.array_equal(const0, const1)
    assert not np.array_equal(sched, const0) and not np.array_equal(sched, const1)


def test_hires_pass_uses_hires_weights(session):
    from lycoris_app.sampling import GenParams

    kw = dict(hires_scale=2.0, hires_steps=4, denoise=0.5)
    r = session.generate(GenParams(f"a dog <lora:{LORA}:1:hr=0>", steps=4, seed=3, **kw))
    assert r.image.size == (128, 128)
    assert r.weights[LORA]["unet"] == [1.0] * 4
    assert set(r.hires_weights[LORA]["unet"]) == {0.0}
    assert "Hires upscale: 2" in r.infotext
    off = np.asarray(r.image)
    on = np.asarray(session.generate(GenParams(f"a dog <lora:{LORA}:1>", steps=4, seed=3, **kw)).image)
    assert not np.array_equal(off, on)


def test_bypass_mode_is_close_to_merge(session):
    merge = _gen(session, f"a dog <lora:{LORA}:0.7>").astype(int)
    bypass = _gen(session, f"a dog <lora:{LORA}:0.7>", mode="bypass").astype(int)
    base = _gen(session, "a dog").astype(int)
    assert np.abs(merge - bypass).mean() < 0.1 * np.abs(merge - base).mean()


def test_every_example_type_and_sampler_runs(session):
    base = _gen(session, "a dog")
    for name in ("moss_loha", "brass_lokr", "glass_oft"):
        assert not np.array_equal(_gen(session, f"a dog <lyco:{name}:1>"), base), name
    for sampler in ("Euler a", "DDIM", "DPM++ 2M"):
        assert _gen(session, f"a dog <lora:{LORA}:0.5>", sampler=sampler).shape == (64, 64, 3)


def test_tokenizer_matches_openai_clip_ids(data_dir):
    from lycoris_app.tokenizer import VOCAB_SIZE, clip_tokenizer

    tok = clip_tokenizer(data_dir)
    assert len(tok) == VOCAB_SIZE
    # openai/CLIP: clip.tokenize("a photo of a cat") -> 49406 320 1125 539 320 2368 49407
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok("Masterpiece!!").input_ids == [49406, 12066, 748, 49407]


# Parameter counts of the real models (diffusers / transformers): the shipped configs must build exactly these.
REAL_PARAMS = {
    "sd1": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    "sd2": {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840},
    "sdxl": {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840},
}


@pytest.mark.parametrize("arch", sorted(REAL_PARAMS))
def test_shipped_configs_build_the_real_architectures(arch):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from lycoris_app.model import CONFIG_DIR

    cfg = CONFIG_DIR / arch
    with torch.device("meta"):
        built = {"unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(cfg / "unet")),
                 "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(cfg / "vae"))}
        for sub, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
            if (cfg / sub).is_dir():
                built[sub] = cls(CLIPTextConfig.from_pretrained(cfg / sub))
    assert {k: sum(p.numel() for p in m.parameters()) for k, m in built.items()} == REAL_PARAMS[arch]


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_single_file_checkpoint_loads_offline(arch, tmp_path, data_dir):
    """A tiny original-layout (LDM/SGM) checkpoint through `load_checkpoint`, configs from a local folder."""
    import shutil

    import torch
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    from fixtures import models as fm
    from lib_lycoris.patcher import Patcher
    from lycoris_app.model import CONFIG_DIR, load_checkpoint

    tiny = {"sd1": fm.sd1_original, "sd2": fm.sd2_original, "sdxl": fm.sdxl_original}[arch](0)
    cfg = tmp_path / "cfg"
    shutil.copytree(CONFIG_DIR / arch, cfg)          # the shipped folder, widths swapped for the tiny ones
    (cfg / "unet" / "config.json").write_text(json.dumps(dict(fm.unet_config(arch), _class_name="UNet2DConditionModel")))
    for i, te in enumerate(tiny.text_encoders):
        (cfg / ("text_encoder" if i == 0 else "text_encoder_2") / "config.json").write_text(json.dumps(te.config.to_dict()))
    ckpt = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.root.state_dict().items()}, str(ckpt))
    # The fixtures have no VAE; a real checkpoint's `first_stage_model.*` goes through the same loader.
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4)
    model = load_checkpoint(ckpt, data_dir, config_dir=cfg, vae=vae)
    assert model.arch == arch and len(model.encoders) == len(tiny.text_encoders)
    ref, got = tiny.unet.state_dict(), model.unet.state_dict()
    assert set(ref) == set(got) and all(torch.equal(ref[k], got[k]) for k in ref)
    for te, enc in zip(tiny.text_encoders, model.encoders):
        a, b = te.state_dict(), enc.model.state_dict()
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert Patcher(model.patch_root()).modelmap.arch == arch


def test_step_warnings_once_per_pass(session):
    from lycoris_app.sampling import GenParams

    r = session.generate(GenParams(f"a dog <lora:{LORA}:1:start=9>", steps=4, seed=3))
    assert len([w for w in r.warnings if "start=9" in w]) == 1, r.warnings
    r = session.generate(GenParams(f"a dog <lora:{LORA}:1:start=9>", steps=4, seed=3, hires_scale=2, hires_steps=4))
    assert len([w for w in r.warnings if "start=9" in w and "hires" in w]) == 1, r.warnings


# --------------------------------------------------------------------------------------------------
# The weight plot: hold schedules as steps, interp=linear as ramps, block weights from the engine

def _plotted(rows: list, label: str, x: float) -> float:
    """The value at `x` of the line the plot draws through one series' rows, in their order."""
    points = [(s, w) for s, w, series in rows if series == label]
    assert points, f"no series {label!r} in {sorted({r[2] for r in rows})}"
    assert all(a[0] <= b[0] for a, b in zip(points, points[1:])), "x must not go back within a series"
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1 and x1 > x0:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    raise AssertionError(f"x={x} is outside the series {label!r}: {points}")


def test_weight_plot_draws_hold_as_steps(session):
    from lycoris_app.sampling import GenParams

    r = session.generate(GenParams(f"a dog <lora:{LORA}:te=0.2@1,1@3>", steps=4, seed=3))
    rows = r.weight_rows()
    for part in ("te", "unet"):
        label = f"{LORA} {part}"
        assert _plotted(rows, label, 2.5) == pytest.approx(0.2)     # held until the keyframe at step 3
        assert _plotted(rows, label, 1.5) == pytest.approx(0.2)
        assert _plotted(rows, label, 3.5) == pytest.approx(1.0)
        # Between step s and s+1 the line is flat at the value the engine used for step s.
        for s in (1, 2, 3):
            assert _plotted(rows, label, s + 0.99) == pytest.approx(r.weights[LORA][part][s - 1])
    assert not any(" in" in series for _, _, series in rows), "no block lines for a tag without block weights"


def test_weight_plot_ramps_only_for_interp_linear(session):
    from lycoris_app.sampling import GenParams

    r = session.generate(GenParams(f"a dog <lora:{LORA}:te=0.2@1,1@3:interp=linear>", steps=4, seed=3))
    rows = r.weight_rows()
    for x, expected in ((1.5, 0.4), (2.0, 0.6), (2.5, 0.8), (3.5, 1.0)):    # 0.2 + 0.8 * (x - 1) / 2 up to 3
        assert _plotted(rows, f"{LORA} te", x) == pytest.approx(expected), x


def test_weight_plot_linear_schedule_still_steps_at_stop():
    """start/stop switch a network off between two steps: a jump, even when the schedule ramps."""
    from lib_lycoris.tags import parse_prompt
    from lycoris_app.sampling import GenResult, weight_series

    req = parse_prompt("<lora:x:te=0@1,1@5:interp=linear:stop=3>").requests[0]
    rows = GenResult(image=None, infotext="", warnings=[], series=weight_series(req, "sd1", 5)).weight_rows()
    assert _plotted(rows, "x te", 2.5) == pytest.approx(0.375)           # ramping: 0.25 at 2, 0.5 at 3
    assert _plotted(rows, "x te", 3.5) == pytest.approx(0.5)             # then held until it stops at step 4
    assert _plotted(rows, "x te", 4.5) == 0.0


def test_weight_plot_shows_block_weights_from_the_engine(session):
    from lib_lycoris.tags import parse_prompt
    from lycoris_app.sampling import GenParams

    tag = f"<lora:{LORA}:0.8:in=0:out=1.2>"
    r = session.generate(GenParams(f"a dog {tag}", steps=4, seed=3))
    rows = r.weight_rows()
    req = parse_prompt(tag).requests[0]
    for group, block in (("in", "IN04"), ("mid", "M00"), ("out", "OUT03")):
        for s in (1, 2, 3):
            assert _plotted(rows, f"{LORA} unet {group}", s + 0.5) == pytest.approx(req.weight("unet", block, s, 4))
    assert _plotted(rows, f"{LORA} unet in", 2.5) == 0.0
    assert _plotted(rows, f"{LORA} unet out", 2.5) == pytest.approx(0.96)
    assert _plotted(rows, f"{LORA} unet", 2.5) == pytest.approx(0.8)


def test_weight_plot_splits_a_block_group_that_lbw_splits_and_labels_hires():
    from lib_lycoris.tags import parse_prompt
    from lycoris_app.sampling import GenResult, weight_series

    # 12-value list: BASE, IN04, IN05, IN07, IN08, M00, OUT00..OUT05 (the ids it leaves out get 0).
    req = parse_prompt("<lora:x:1:lbw=1,1,1,1,1,1,0.5,0.5,0.5,0.5,0.5,0.5:hr=0.5>").requests[0]
    series = weight_series(req, "sd1", 3) + weight_series(req, "sd1", 2, hires=True)
    by_label = {s.label: s.values for s in series}
    assert by_label["x unet out OUT00-OUT05"] == (0.5,) * 3
    assert by_label["x unet out OUT06-OUT11"] == (0.0,) * 3
    assert by_label["x unet in IN04-IN05,IN07-IN08"] == (1.0,) * 3
    assert by_label["x unet in IN00-IN03,IN06,IN09-IN11"] == (0.0,) * 3
    assert by_label["x unet mid"] == (1.0,) * 3
    assert by_label["x unet out OUT00-OUT05 (hires)"] == (0.25,) * 2
    rows = GenResult(image=None, infotext="", warnings=[], series=series).weight_rows()
    assert {s for s, _, label in rows if label.endswith("(hires)")} == {4, 5}    # after the 3 first-pass steps


# --------------------------------------------------------------------------------------------------
# Export LoRA (#13): the prompt's tags as one file in networks/exports, listed, and usable by its tag

EXPORT_PROMPT = f"a red cat <lora:{LORA}:0.8> <lora:moss_loha:0.5>"
EXPORT_INPUTS = ((LORA, 0.8), ("moss_loha", 0.5))


def _raw_delta(t: dict):
    """ΔW (out, in·kh·kw) of one module from its raw tensors, float64, by the formulas of the LyCORIS papers
    (LoRA: up @ down · alpha/rank; LoHa: (w1a @ w1b) ⊙ (w2a @ w2b) · alpha/rank; a full diff as it is): no
    code of ours."""
    if "diff" in t:
        return t["diff"].reshape(t["diff"].shape[0], -1)
    if "lora_down.weight" in t:
        down, up = t["lora_down.weight"], t["lora_up.weight"]
        rank = down.shape[0]
        return up.reshape(up.shape[0], rank) @ down.reshape(rank, -1) * float(t["alpha"]) / rank
    if "hada_w1_a" in t:
        rank = t["hada_w1_b"].shape[0]
        w1 = t["hada_w1_a"] @ t["hada_w1_b"].reshape(rank, -1)
        w2 = t["hada_w2_a"] @ t["hada_w2_b"].reshape(rank, -1)
        return w1 * w2 * float(t["alpha"]) / rank
    raise AssertionError(f"unexpected module keys {sorted(t)}")


@pytest.fixture(scope="module")
def exported(session):
    from lycoris_app.export import export_from_prompt

    return export_from_prompt(session, EXPORT_PROMPT, "exact", name="ink+moss mix")


def test_export_writes_the_sum_of_the_scaled_inputs(exported, data_dir):
    """The file is Σ m·ΔW of the prompt's two networks, module by module, within the exact mode's tolerance."""
    import json as _json

    from lib_lycoris.export import EXACT_VERIFY
    from lib_lycoris.files import read_metadata
    from lib_lycoris.network import load_network

    networks = data_dir / "networks"
    assert exported.path == networks / "exports" / "ink+moss mix.safetensors"
    assert exported.tag == "<lora:exports/ink+moss mix:1>" and not exported.replaced
    assert exported.size == exported.path.stat().st_size
    net = load_network(exported.path)                     # our loader reads it
    assert net.modules and {m.algo for m in net.modules.values()} <= {"lora", "full"}
    want: dict = {}
    for name, m in EXPORT_INPUTS:
        for module, t in kohya_modules(networks / f"{name}.safetensors").items():
            want[module] = want.get(module, 0) + m * _raw_delta(t)
    got = {module: _raw_delta(t) for module, t in kohya_modules(exported.path).items()}
    assert set(got) == set(want)
    worst = max(float((got[k] - want[k]).norm() / want[k].norm()) for k in want)
    assert worst <= EXACT_VERIFY, worst
    md = read_metadata(exported.path)
    assert md["ss_sd_model_name"] == "lycoris-tiny-sd1" and md["ss_output_name"] == "ink+moss mix"
    sources = _json.loads(md["lycoris_export"])["sources"]
    assert [s["tag"] for s in sources] == [f"<lora:{LORA}:0.8>", "<lora:moss_loha:0.5>"]
    assert exported.report.max_rel_error <= EXACT_VERIFY


def test_export_is_listed_and_its_tag_gives_the_two_tag_image(exported, session):
    from lycoris_app.app import network_cards
    from lycoris_app.export import prompt_with, report_html

    cards = {c["name"]: c for c in network_cards(session)}
    card = cards["exports/ink+moss mix"]
    assert card["tag"] == exported.tag and card["error"] is None and card["base_model"] == "sd1"
    assert prompt_with(EXPORT_PROMPT, exported.tag) == f"a red cat {exported.tag}"
    base = _gen(session, "a red cat").astype(int)
    both = _gen(session, EXPORT_PROMPT).astype(int)
    one = _gen(session, prompt_with(EXPORT_PROMPT, exported.tag)).astype(int)
    effect = np.abs(both - base).mean()
    assert effect > 1.0, "the two networks did not change the image"
    assert np.abs(one - both).max() <= 2 and np.abs(one - both).mean() < 0.01 * effect
    page = report_html(exported)
    assert "exports/ink+moss mix.safetensors" in page and "&lt;lora:exports/ink+moss mix:1&gt;" in page
    assert "retained energy 1.000000" in page


def test_export_refusals_are_one_message_and_write_nothing(session, exported):
    from lib_lycoris.errors import LycorisError
    from lycoris_app.export import export_from_prompt

    folder = exported.path.parent
    before = sorted(p.name for p in folder.iterdir())
    cases = {
        f"a cat <lora:{LORA}:abc>": ("rank", 4, "not a number"),                  # bad tag
        "a cat <lora:no_such_network:1>": ("rank", 4, "no network called 'no_such_network'"),
        f"a cat <lora:{LORA}:0@1,1@3>": ("rank", 4, "give the step to export"),    # a schedule, no step
        "a cat": ("rank", 4, "no <lora:"),
        f"a cat <lora:{LORA}:1>": ("rank", None, "needs a number"),
        f"a cat <lora:{LORA}:0.5>": ("fro", 1.5, "fraction"),
    }
    for prompt, (mode, value, words) in cases.items():
        with pytest.raises(LycorisError) as e:
            export_from_prompt(session, prompt, mode, value, name="refused")
        assert words in str(e.value) and "\n" not in str(e.value), (prompt, str(e.value))
    with pytest.raises(LycorisError, match="outside 1..4"):
        export_from_prompt(session, f"<lora:{LORA}:0@1,1@3>", "rank", 4, name="refused", step=5, steps=4)
    with pytest.raises(LycorisError, match="exists; choose another name, or allow overwriting"):
        export_from_prompt(session, EXPORT_PROMPT, "rank", 4, name="ink+moss mix")
    assert sorted(p.name for p in folder.iterdir()) == before
    # A schedule at a named step: the weights of that step (0 before the keyframe at 3: nothing to export).
    at3 = export_from_prompt(session, f"<lora:{LORA}:0@1,1@3>", "rank", 4, name="ink at step 3", step=3, steps=4)
    assert at3.report.units and '"step": 3' in json.dumps(at3.report.sources)
    with pytest.raises(LycorisError, match="nothing to export"):
        export_from_prompt(session, f"<lora:{LORA}:0@1,1@3>", "rank", 4, name="ink at step 1", step=1, steps=4)
    again = export_from_prompt(session, f"<lora:{LORA}:0.3>", "rank", 2, name="ink at step 3", overwrite=True)
    assert again.replaced and again.report.mode.describe() == "rank 2"


@pytest.mark.parametrize("name", ["../escape", "..", "/tmp/escape", "sub/escape", "sub\\escape", ".hidden", "",
                                  "   ", "nul\x00byte", "line\nbreak", "C:escape", "~escape", "x" * 200,
                                  LORA, LORA.upper(), "moss_loha.safetensors"])
def test_export_names_cannot_leave_the_folder_or_take_a_tag(session, data_dir, name):
    from lib_lycoris.errors import LycorisError
    from lycoris_app.export import export_from_prompt

    def files() -> set:
        return {p for p in data_dir.rglob("*") if p.is_file()} | {p for p in Path("/tmp").glob("escape*")}

    before = files()
    with pytest.raises(LycorisError) as e:
        export_from_prompt(session, f"<lora:{LORA}:1>", "rank", 4, name=name)
    assert ("plain file name" in str(e.value) or "is taken" in str(e.value)
            or "give a file name" in str(e.value)), str(e.value)
    assert files() == before


def test_cli_export_writes_and_refuses(cli_run, data_dir):
    r = _cli("export", f"<lora:{LORA}:0.6> <lyco:brass_lokr:0.4>", "--name", "cli mix", "--rank", "4", "--json",
             data_dir=data_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["tag"] == "<lora:exports/cli mix:1>" and Path(out["output"]).is_file()
    assert 0 < out["report"]["retained_energy"] <= 1 and out["report"]["mode"] == {"kind": "rank", "value": 4.0}
    r = _cli("export", "<lora:no_such_network:1>", "--name", "cli bad", "--exact", data_dir=data_dir)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: no network called 'no_such_network'"), r.stderr
    assert not (data_dir / "networks" / "exports" / "cli bad.safetensors").exists()
