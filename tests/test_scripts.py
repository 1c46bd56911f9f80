"""The WebUI glue (scripts/lycoris_loader.py) against fake host modules (tests/host_stubs) and a tiny SD1 model.

Checks what the glue itself decides: that it takes over the `lora`/`lyco` handlers, that a batch applies and
`deactivate` gives the original bits back, that scheduled weights move in the per-step callback, that a
te schedule splices per-segment conds into the host's scheduled-cond lists, the infotext hash field and its
paste-back, the trigger-word insertion. The real WebUI run is described in docs/webui.md.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fixtures.models import tiny_model
from lib_lycoris.files import addnet_hash
from synth import make_network

ROOT = Path(__file__).resolve().parent.parent
STUBS = Path(__file__).resolve().parent / "host_stubs"


@pytest.fixture()
def glue(tmp_path, monkeypatch):
    """The script module, imported fresh against the stubs, with a networks folder and a tiny SD1 model."""
    monkeypatch.syspath_prepend(str(STUBS))
    for name in [m for m in sys.modules if m == "modules" or m.startswith("modules.")]:
        monkeypatch.delitem(sys.modules, name)
    from modules import extra_networks, shared
    extra_networks.extra_network_registry.clear()
    extra_networks.extra_network_aliases.clear()
    builtin = extra_networks.ExtraNetwork("lora")
    extra_networks.register_extra_network(builtin)
    extra_networks.register_extra_network_alias(builtin, "lyco")
    lora_dir = tmp_path / "Lora"
    lora_dir.mkdir()
    shared.cmd_opts.lora_dir = str(lora_dir)
    shared.cmd_opts.lyco_dir_backcompat = str(tmp_path / "LyCORIS")
    tm = tiny_model("sd1", 0)
    shared.sd_model = tm.root
    shared.opts.lycoris_keep_applied = False   # deactivate restores (the tests of parking: `both`, `test_parked_*`)
    spec = importlib.util.spec_from_file_location("lycoris_loader_under_test", ROOT / "scripts" / "lycoris_loader.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    make_network(lora_dir / "ink.safetensors", tm.root, "lora", seed=1)
    (lora_dir / "sub").mkdir()
    make_network(lora_dir / "sub" / "hat.safetensors", tm.root, "loha", seed=2)
    return SimpleNamespace(mod=mod, tm=tm, dir=lora_dir, shared=shared, en=extra_networks, builtin=builtin)


@pytest.fixture(params=["restore", "park"])
def both(request, glue):
    """The glue with deactivate restoring, and with it parking the networks (lycoris_keep_applied, the default)."""
    glue.shared.opts.lycoris_keep_applied = request.param == "park"
    return glue


def _next_without_tags_is_base(glue, p, base) -> None:
    """The generation ends and the next has no tag: the model is `base` bit for bit (restored at deactivate,
    or, parked, at that activate)."""
    net = glue.mod.EXTRA_NETWORK
    net.deactivate(p)
    if not glue.shared.opts.lycoris_keep_applied:
        assert _same(glue.tm.root, base)
    net.activate(_p(glue.shared), [])
    assert _same(glue.tm.root, base)


def _same_as_fresh(glue, items, seed: int = 0) -> None:
    """The model equals a fresh tiny model (`seed`) with these (network stem, strength) applied by a new Patcher."""
    from lib_lycoris.network import load_network
    from lib_lycoris.patcher import Patcher, Strength
    fresh = tiny_model("sd1", seed)
    Patcher(fresh.root).apply([(load_network(glue.dir / f"{n}.safetensors"), Strength(m)) for n, m in items])
    for (k, a), (_, b) in zip(glue.tm.root.named_parameters(), fresh.root.named_parameters()):
        assert torch.equal(a, b), k


def _p(shared, prompt="a cat", steps=4):
    comments = []
    p = SimpleNamespace(sd_model=shared.sd_model, steps=steps, is_hr_pass=False, prompts=[prompt],
                        extra_generation_params={}, comment=comments.append)
    p.comments = comments
    return p


def _params(en, tags: str):
    """What the host hands the `lora` handler: the params of `lora` tags and of its alias `lyco`."""
    data = en.parse_prompt(tags)[1]
    return data.get("lora", []) + data.get("lyco", [])


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _same(model, snap) -> bool:
    return all(torch.equal(v, snap[k]) for k, v in model.named_parameters())


def test_takes_over_lora_and_lyco(glue):
    glue.mod.before_ui()
    # A1111 runs before_ui callbacks in reverse order: the built-in registers itself again after ours ...
    glue.en.register_extra_network(glue.builtin)
    glue.en.register_extra_network_alias(glue.builtin, "lyco")
    # ... and the first component built (all before_ui done) takes it back.
    glue.mod.before_component(None)
    assert glue.en.extra_network_registry["lora"] is glue.mod.EXTRA_NETWORK
    assert glue.en.extra_network_aliases["lyco"] is glue.mod.EXTRA_NETWORK
    assert glue.builtin not in glue.en.extra_network_registry.values()


def test_activate_changes_weights_and_deactivate_restores_bits(glue):
    net, snap = glue.mod.EXTRA_NETWORK, _snapshot(glue.tm.root)
    p = _p(glue.shared)
    net.activate(p, _params(glue.en, "<lora:ink:0.8> <lyco:hat:1:unet=0.5>"))
    assert not _same(glue.tm.root, snap)
    hashes = p.extra_generation_params["Lora hashes"]
    assert hashes == f"ink: {addnet_hash(glue.dir / 'ink.safetensors')[:12]}, " \
                     f"hat: {addnet_hash(glue.dir / 'sub' / 'hat.safetensors')[:12]}"
    net.deactivate(p)
    assert _same(glue.tm.root, snap)


def test_unmentioned_activate_removes_networks(glue):
    net, snap = glue.mod.EXTRA_NETWORK, _snapshot(glue.tm.root)
    net.activate(_p(glue.shared), _params(glue.en, "<lora:ink:1>"))
    net.activate(_p(glue.shared), [])        # the host's call for a prompt without tags
    assert _same(glue.tm.root, snap)


def test_bad_tag_warns_in_ui_and_infotext_and_others_apply(glue):
    net, snap = glue.mod.EXTRA_NETWORK, _snapshot(glue.tm.root)
    p = _p(glue.shared)
    net.activate(p, _params(glue.en, "<lora:nothere:1> <lora:ink:1>"))
    assert any("nothere" in c for c in p.comments)
    assert "nothere" in p.extra_generation_params["Lora warnings"]
    assert not _same(glue.tm.root, snap)
    net.deactivate(p)
    assert _same(glue.tm.root, snap)


def test_step_callback_moves_scheduled_weights(glue):
    net = glue.mod.EXTRA_NETWORK
    p = _p(glue.shared, steps=4)
    net.activate(p, _params(glue.en, "<lora:ink:0@1,1@3>"))   # off for steps 1-2, on from step 3
    snap = _snapshot(glue.tm.root)
    net.deactivate(p)
    base = _snapshot(glue.tm.root)
    net.activate(p, _params(glue.en, "<lora:ink:0@1,1@3>"))
    assert _same(glue.tm.root, snap) and _same(glue.tm.root, base)   # step 1: weight 0
    den = SimpleNamespace(step=2, total_steps=4)                     # the 3rd denoiser call
    glue.mod.on_cfg_denoiser(SimpleNamespace(denoiser=den, sampling_step=1, total_sampling_steps=4))
    assert not _same(glue.tm.root, base)
    net.deactivate(p)
    assert _same(glue.tm.root, base)


def test_step_callback_without_denoiser_uses_the_samplers(glue):
    """A1111 1.7 passes no denoiser in the callback params, and its state counter lags one call behind:
    the step comes from the sampler's own CFG denoiser (p.sampler.model_wrap_cfg)."""
    net = glue.mod.EXTRA_NETWORK
    p = _p(glue.shared, steps=4)
    base = _snapshot(glue.tm.root)
    net.activate(p, _params(glue.en, "<lora:ink:0@1,1@3>"))   # off for steps 1-2, on from step 3
    p.sampler = SimpleNamespace(model_wrap_cfg=SimpleNamespace(step=1, total_steps=4))
    glue.mod.on_cfg_denoiser(SimpleNamespace(sampling_step=0, total_sampling_steps=4))   # 2nd call: step 2
    assert _same(glue.tm.root, base)
    p.sampler.model_wrap_cfg.step = 2                               # 3rd call (the lagged counter says 1)
    glue.mod.on_cfg_denoiser(SimpleNamespace(sampling_step=1, total_sampling_steps=4))
    assert not _same(glue.tm.root, base)
    net.deactivate(p)
    assert _same(glue.tm.root, base)


def test_cards_on_hosts_without_embedded_previews(glue, monkeypatch):
    """A1111 1.7/1.8 pages have no find_embedded_preview (added in 1.9): the card is built without it."""
    import json
    from modules import shared
    monkeypatch.setitem(sys.modules, "modules.ui_extra_networks", SimpleNamespace(quote_js=json.dumps))
    calls = []
    page = SimpleNamespace(find_preview=lambda base: None, find_description=lambda base: None,
                           search_terms_from_path=lambda path: path, get_sort_keys=lambda path: {},
                           read_user_metadata=lambda item: item.setdefault("user_metadata", {}))
    entry = list(glue.mod.HOST.runtime.index.entries())[0]
    old = glue.mod.card_item(page, entry, 0, shared.opts)
    page.find_embedded_preview = lambda base, name, md: calls.append(name) or "data:image/png;base64,AA"
    new = glue.mod.card_item(page, entry, 0, shared.opts)
    assert old["preview"] is None and new["preview"].startswith("data:") and calls == [entry.relname]


def test_te_schedule_encodes_per_segment_and_splices(glue):
    from modules import prompt_parser as pp
    net = glue.mod.EXTRA_NETWORK
    te = glue.tm.text_encoders[0]
    probe = next(n for n, _ in te.named_parameters() if n.endswith("q_proj.weight"))

    def encode(model, prompts, steps, hires_steps=None, use_old=False):
        w = dict(te.named_parameters())[probe].detach().clone()
        return [[pp.ScheduledPromptConditioning(steps, w)] for _ in prompts]

    calls = {}

    def get_conds_with_caching(function, prompts, steps, caches, extra_network_data, hires_steps=None):
        calls["n"] = calls.get("n", 0) + 1
        return function(glue.tm.root, prompts, steps, hires_steps, False)

    p = _p(glue.shared, steps=10)
    p.get_conds_with_caching = get_conds_with_caching
    net.activate(p, _params(glue.en, "<lora:ink:te=0@1,1@6:unet=1>"))
    conds = p.get_conds_with_caching(encode, ["a cat"], 10, [None], None)
    (sched,) = conds
    assert [e.end_at_step for e in sched] == [4, 10]                   # steps 1-5 -> index 0..4, then 6-10
    assert not torch.equal(sched[0].cond, sched[1].cond)
    assert [c.cond for c in [sched[0]]][0].shape == sched[1].cond.shape
    assert torch.equal(pp.reconstruct_cond_batch(conds, 4)[0], sched[0].cond)
    assert torch.equal(pp.reconstruct_cond_batch(conds, 5)[0], sched[1].cond)
    net.deactivate(p)


def test_splice_keeps_prompt_editing():
    spec = importlib.util.spec_from_file_location("glue_splice", ROOT / "scripts" / "lycoris_loader.py")
    # splice_schedules is pure; take it from the module text without the host (import needs stubs)
    sys.path.insert(0, str(STUBS))
    try:
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(STUBS))
    seg_a = [(3, "a0"), (9, "a1")]      # prompt edit at 0-based step 3
    seg_b = [(3, "b0"), (9, "b1")]
    assert mod.splice_schedules([seg_a, seg_b], [5, 9]) == [(3, "a0"), (5, "a1"), (9, "b1")]
    assert mod.splice_schedules([seg_a, seg_b], [1, 9]) == [(1, "a0"), (3, "b0"), (9, "b1")]


def test_infotext_paste_restores_local_names(glue):
    h = addnet_hash(glue.dir / "ink.safetensors")[:12]
    params = {"Prompt": "a <lora:somebody_else_name:0.7> cat", "Lora hashes": f"somebody_else_name: {h}"}
    glue.mod.on_infotext_pasted("", params)
    assert params["Prompt"] == "a <lora:ink:0.7> cat"


def test_trigger_words_inserted_when_enabled(glue):
    import json
    (glue.dir / "ink.json").write_text(json.dumps({"activation text": "inkstyle, bold lines"}))
    glue.shared.opts.lycoris_trigger_words = 1
    p = _p(glue.shared, prompt="a cat, _tags_, outdoors")
    glue.mod.EXTRA_NETWORK.activate(p, _params(glue.en, "<lora:ink:1>"))
    assert p.prompts == ["a cat, inkstyle, outdoors"]
    glue.mod.EXTRA_NETWORK.deactivate(p)
    assert glue.mod.insert_words("inkstyle cat", ["inkstyle"]) == "inkstyle cat"
    assert glue.mod.insert_words("cat", ["a", "b"]) == "cat, a, b"


def test_preload_adds_folders_once(monkeypatch):
    import argparse
    monkeypatch.syspath_prepend(str(STUBS))
    spec = importlib.util.spec_from_file_location("lycoris_preload", ROOT / "preload.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    parser = argparse.ArgumentParser()
    mod.preload(parser)
    mod.preload(parser)          # the built-in's preload ran first: nothing is added twice
    args = parser.parse_args(["--lyco-dir", "/x"])
    assert args.lyco_dir_backcompat == "/x" and args.lora_dir.endswith("Lora")


def test_keep_backups_setting(glue):
    """On by default (a CPU model keeps its backups after deactivate); off frees them and stops keeping."""
    net = glue.mod.EXTRA_NETWORK
    p = _p(glue.shared)
    net.activate(p, _params(glue.en, "<lora:ink:1>"))
    net.deactivate(p)
    patcher = glue.mod.HOST._patcher
    assert patcher.extra_memory() > 0
    glue.shared.opts.lycoris_keep_backups = False
    glue.mod.HOST.keep_backups_changed()
    assert patcher.extra_memory() == 0
    net.activate(p, _params(glue.en, "<lora:ink:1>"))
    net.deactivate(p)
    assert patcher.extra_memory() == 0


@pytest.mark.parametrize("names,expected", [
    (("clip_l",), {"unet", "te1"}),                       # SD1
    (("clip_h",), {"unet", "te1"}),                       # SD2: Forge's OpenCLIP-H in HF layout
    (("clip_l", "clip_g"), {"unet", "te1", "te2"}),       # SDXL
])
def test_forge_text_encoders_found(glue, names, expected):
    """Forge holds its text encoders under cond_stage_model.clip_l / clip_h / clip_g, each with .transformer."""
    towers = {n: SimpleNamespace(transformer=torch.nn.Linear(2, 2)) for n in names}
    unet = torch.nn.Linear(2, 2)
    forge = SimpleNamespace(unet=SimpleNamespace(model=SimpleNamespace(diffusion_model=unet)),
                            clip=SimpleNamespace(cond_stage_model=SimpleNamespace(**towers)))
    comps = glue.mod.model_components(SimpleNamespace(forge_objects=forge))
    assert set(comps) == expected and comps["unet"] is unet
    assert comps["te1"] is towers[names[0]].transformer
    if "te2" in expected:
        assert comps["te2"] is towers["clip_g"].transformer


def _forge_like(root):
    """A Forge-shaped model object over a tiny SD1 model's parts (forge_objects.unet / .clip)."""
    clip = SimpleNamespace(cond_stage_model=SimpleNamespace(
        clip_l=SimpleNamespace(transformer=root.cond_stage_model.transformer)))
    unet = SimpleNamespace(model=SimpleNamespace(diffusion_model=root.model.diffusion_model))
    return SimpleNamespace(forge_objects=SimpleNamespace(unet=unet, clip=clip), root=root)


def test_forge_frees_kept_backups_once_no_network_is_on(glue):
    """Forge's built-in Lora frees its weight backups once no LoRA is on the model; ours then too (A1111's
    keeps its own for the model's life, and ours stay kept there): a tag-free image after a tagged one
    leaves the model at base with nothing of ours held."""
    net, host = glue.mod.EXTRA_NETWORK, glue.mod.HOST
    glue.shared.opts.lycoris_keep_applied = True
    base = _snapshot(glue.tm.root)
    for forge in (True, False):
        glue.shared.sd_model = _forge_like(glue.tm.root) if forge else glue.tm.root
        p = _p(glue.shared)
        net.activate(p, _params(glue.en, "<lora:ink:1>"))
        assert not _same(glue.tm.root, base)
        net.deactivate(p)                                   # parked: its backups are in use
        assert host._patcher.extra_memory() > 0
        p = _p(glue.shared)
        net.activate(p, [])
        assert _same(glue.tm.root, base)
        assert (host._patcher.extra_memory() == 0) == forge, forge
        net.deactivate(p)


@pytest.mark.parametrize("host_keeps_it", [False, True])
def test_forge_reload_lets_the_old_model_go_before_the_new_one_loads(glue, monkeypatch, host_keeps_it):
    """Forge builds a new model for a new checkpoint at the next generation and calls no extension before it
    drops the old one: the guard on its forge_model_reload gives the old model its bits back and lets it go,
    so the host's own collection frees it before the new one loads (not after, at its model-loaded
    callback: both were alive at the peak). A model someone still holds is left exactly at base."""
    import gc
    import types
    import weakref
    import modules
    net, host = glue.mod.EXTRA_NETWORK, glue.mod.HOST
    glue.shared.opts.lycoris_keep_applied = True
    model_data = SimpleNamespace(forge_hash="A", forge_loading_parameters="A", sd_model=None)
    seen = {}

    def forge_model_reload():                     # Forge's, reduced: drop, collect, load, callback
        if model_data.forge_hash == str(model_data.forge_loading_parameters):
            return model_data.sd_model, False
        model_data.sd_model = glue.shared.sd_model = None
        gc.collect()
        seen["old alive at the load"] = old() is not None
        new = _forge_like(tiny_model("sd1", 7).root)
        model_data.sd_model = glue.shared.sd_model = new
        host.model_loaded(new)
        model_data.forge_hash = model_data.forge_loading_parameters
        return new, True
    sd_models, processing = types.ModuleType("modules.sd_models"), types.ModuleType("modules.processing")
    sd_models.forge_model_reload, sd_models.model_data = forge_model_reload, model_data
    processing.forge_model_reload = forge_model_reload          # `from modules.sd_models import ...`
    for name, module in (("sd_models", sd_models), ("processing", processing)):
        monkeypatch.setitem(sys.modules, f"modules.{name}", module)
        monkeypatch.setattr(modules, name, module, raising=False)
    assert glue.mod.install_reload_guard() and glue.mod.install_reload_guard()   # a UI reload: once
    assert processing.forge_model_reload is sd_models.forge_model_reload is not forge_model_reload
    assert sd_models.forge_model_reload.lycoris_original is forge_model_reload
    tm = tiny_model("sd1", 0)
    base = _snapshot(tm.root)
    model_data.sd_model = glue.shared.sd_model = _forge_like(tm.root)
    p = _p(glue.shared)
    net.activate(p, _params(glue.en, "<lora:ink:1>"))
    net.deactivate(p)                             # the networks stay in the old model's weights
    assert processing.forge_model_reload()[1] is False and not _same(tm.root, base)   # nothing pending
    old = weakref.ref(tm.root)
    kept = tm.root if host_keeps_it else None
    del tm, p
    model_data.forge_loading_parameters = "B"     # the user picked another checkpoint
    new, reloaded = processing.forge_model_reload()
    assert reloaded and seen["old alive at the load"] == host_keeps_it
    if host_keeps_it:
        assert _same(kept, base)
    p = _p(glue.shared)
    net.activate(p, _params(glue.en, "<lora:ink:1>"))  # the new model works
    _same_as_fresh(SimpleNamespace(dir=glue.dir, tm=SimpleNamespace(root=new.root)), [("ink", 1.0)], seed=7)
    net.deactivate(p)
    with monkeypatch.context() as m:              # our part failing never stops the host's load
        m.setattr(host, "before_reload", lambda: {}["boom"])
        model_data.forge_loading_parameters = "C"
        assert processing.forge_model_reload()[1] is True


def test_each_warning_logged_once(glue, caplog):
    """A missing network and a bad item: one log line each (the infotext and UI also carry them once)."""
    import logging
    net = glue.mod.EXTRA_NETWORK
    with caplog.at_level(logging.WARNING, logger="lycoris"):
        net.activate(_p(glue.shared), _params(glue.en, "<lora:nothere:1> <lora:ink:1:bogus=3>"))
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("nothere" in m for m in lines) == 1 and sum("bogus" in m for m in lines) == 1, lines


# --------------------------------------------------------------------------------------------------
# Hand-back to the built-in Lora (never worse than the built-in)

class _Recorder:
    """A built-in handler that records what the host would have given it."""

    def __init__(self):
        self.name = "lora"
        self.calls = []

    def activate(self, p, params_list):
        self.calls.append(("activate", [list(x.items) for x in params_list]))

    def deactivate(self, p):
        self.calls.append(("deactivate",))


def _with_recorder(glue):
    rec = _Recorder()
    glue.en.extra_network_registry["lora"] = rec      # what the built-in registered before ours
    glue.mod.before_ui()
    assert glue.mod.EXTRA_NETWORK.builtin is rec
    return rec


def _unmapped_model():
    """A model class the engine has no map for (a DiT it doesn't know), held the way A1111 holds one."""
    dm = torch.nn.Module()
    dm.add_module("patchify", torch.nn.Linear(4, 8))
    dm.add_module("mystery_blocks", torch.nn.ModuleList([torch.nn.Linear(8, 8) for _ in range(2)]))
    return SimpleNamespace(model=SimpleNamespace(diffusion_model=dm))


def test_unmapped_family_hands_tags_to_the_builtin_unchanged(glue):
    rec = _with_recorder(glue)
    glue.shared.sd_model = _unmapped_model()
    tags = "<lora:ink:0.8:te=0.1@1,0.6@6> <lyco:hat:1:unet=0.5>"
    p = SimpleNamespace(**{**vars(_p(glue.shared)), "sd_model": glue.shared.sd_model})
    params = _params(glue.en, tags)
    glue.mod.EXTRA_NETWORK.activate(p, params)
    glue.mod.EXTRA_NETWORK.deactivate(p)
    assert rec.calls == [("activate", [x.items for x in params]), ("deactivate",)]
    assert glue.mod.HOST.activation is None and "Lora hashes" not in p.extra_generation_params


def test_mapped_family_is_ours_and_the_builtin_gets_nothing(glue):
    rec = _with_recorder(glue)
    snap = _snapshot(glue.tm.root)
    p = _p(glue.shared)
    glue.mod.EXTRA_NETWORK.activate(p, _params(glue.en, "<lora:ink:1>"))
    assert not _same(glue.tm.root, snap) and "Lora hashes" in p.extra_generation_params
    glue.mod.EXTRA_NETWORK.deactivate(p)
    assert _same(glue.tm.root, snap) and rec.calls == []


def test_family_set_to_the_builtin_in_settings(glue):
    rec = _with_recorder(glue)
    glue.shared.opts.lycoris_handback_families = ["sd1"]
    glue.mod.HOST.model_loaded(glue.shared.sd_model)
    snap = _snapshot(glue.tm.root)
    p = _p(glue.shared)
    params = _params(glue.en, "<lora:ink:1>")
    glue.mod.EXTRA_NETWORK.activate(p, params)
    assert _same(glue.tm.root, snap) and rec.calls == [("activate", [x.items for x in params])]
    glue.shared.opts.lycoris_handback_families = []
    glue.mod.HOST.model_loaded(glue.shared.sd_model)
    glue.mod.EXTRA_NETWORK.activate(_p(glue.shared), _params(glue.en, "<lora:ink:1>"))
    glue.mod.EXTRA_NETWORK.deactivate(p)
    assert glue.mod.HOST._patcher.extra_memory() > 0                   # our backups kept after restore
    glue.shared.opts.lycoris_handback_families = ["sd1"]
    glue.mod.EXTRA_NETWORK.activate(p, params)
    assert glue.mod.HOST._patcher.extra_memory() == 0                  # freed: the built-in backs up its own
    glue.shared.opts.lycoris_handback_families = []
    glue.mod.EXTRA_NETWORK.activate(_p(glue.shared), _params(glue.en, "<lora:ink:1>"))
    assert rec.calls[-1] == ("activate", []) and not _same(glue.tm.root, snap)   # the built-in emptied first
    glue.mod.EXTRA_NETWORK.deactivate(p)
    assert _same(glue.tm.root, snap)


def _old_oft(path, model):
    """A file only the built-in reads: old LyCORIS OFT (`oft_diag`), kohya key style."""
    from safetensors.torch import save_file
    name = next(n for n, _ in model.named_parameters() if n.endswith("attn1.to_q.weight"))
    body = name[: -len(".weight")].replace("model.diffusion_model.", "lora_unet_").replace(".", "_")
    save_file({f"{body}.oft_diag": torch.zeros(4, 8, 8)}, str(path))


def test_a_file_only_the_builtin_reads_goes_to_the_builtin(glue):
    rec = _with_recorder(glue)
    _old_oft(glue.dir / "oldoft.safetensors", glue.tm.root)
    snap = _snapshot(glue.tm.root)
    p = _p(glue.shared)
    params = _params(glue.en, "<lora:oldoft:1>")
    glue.mod.EXTRA_NETWORK.activate(p, params)
    assert rec.calls == [("activate", [x.items for x in params])] and _same(glue.tm.root, snap)
    glue.mod.EXTRA_NETWORK.deactivate(p)
    assert rec.calls[-1] == ("deactivate",)


def test_a_builtin_only_file_beside_ours_is_not_applied_twice(glue):
    """Mixed: ours apply what they read; the other file gets a warning, the built-in is never called (two
    loaders holding backups of one weight could corrupt it)."""
    rec = _with_recorder(glue)
    _old_oft(glue.dir / "oldoft.safetensors", glue.tm.root)
    snap = _snapshot(glue.tm.root)
    p = _p(glue.shared)
    glue.mod.EXTRA_NETWORK.activate(p, _params(glue.en, "<lora:oldoft:1> <lora:ink:1>"))
    assert rec.calls == [] and not _same(glue.tm.root, snap)
    assert "oldoft" in p.extra_generation_params["Lora warnings"]
    glue.mod.EXTRA_NETWORK.deactivate(p)
    assert _same(glue.tm.root, snap)


def test_builtin_weights_restored_before_ours_write(glue, monkeypatch):
    """After a handed-back generation on the same model, A1111's built-in still holds patched weights that
    it would restore lazily at the next forward: they go back before ours write."""
    rec = _with_recorder(glue)
    _old_oft(glue.dir / "oldoft.safetensors", glue.tm.root)
    glue.mod.EXTRA_NETWORK.activate(_p(glue.shared), _params(glue.en, "<lora:oldoft:1>"))
    snap = _snapshot(glue.tm.root)
    layer = next(m for m in glue.tm.root.modules() if isinstance(m, torch.nn.Linear))
    backup = layer.weight.detach().clone()
    with torch.no_grad():
        layer.weight.add_(1.0)                        # the built-in's patch
    layer.network_current_names = (("oldoft", 1.0, 1.0, None),)

    def restore(module):
        with torch.no_grad():
            module.weight.copy_(backup)
    monkeypatch.setitem(sys.modules, "networks", SimpleNamespace(network_restore_weights_from_backup=restore))
    p = _p(glue.shared)
    glue.mod.EXTRA_NETWORK.activate(p, _params(glue.en, "<lora:ink:1>"))
    assert rec.calls[-1] == ("activate", []) and layer.network_current_names == ()
    glue.mod.EXTRA_NETWORK.deactivate(p)
    assert _same(glue.tm.root, snap)


# --------------------------------------------------------------------------------------------------
# Faults a long-running WebUI meets

def _oom_at_write(n: int, calls: list):
    """A stand-in for `Patcher._write` (the per-weight write) whose n-th call raises a simulated CUDA
    out-of-memory error; each call is appended to `calls`."""
    from lib_lycoris.patcher import Patcher
    real = Patcher._write

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == n:
            raise torch.OutOfMemoryError("simulated: CUDA out of memory")
        return real(*a, **k)
    return flaky


def test_failure_inside_apply_gives_an_image_without_networks(both, monkeypatch):
    """An out-of-memory error on the 10th weight: rolled back, the generation goes on at base, with a warning."""
    from lib_lycoris.patcher import Patcher
    real, calls = Patcher._write, []
    flaky = _oom_at_write(10, calls)
    glue = both
    monkeypatch.setattr(Patcher, "_write", flaky)
    snap = _snapshot(glue.tm.root)
    p = _p(glue.shared)
    cache = [None, None]           # A1111's class-level cond cache: [key (prompt, tags, ...), conds]

    def get_conds_with_caching(function, required_prompts, steps, caches, extra_network_data, hires_steps=None):
        key = (tuple(required_prompts), steps, repr(extra_network_data))     # A1111: prompt, steps, tags
        for c in caches:
            if c[0] == key:
                return c[1]
        for c in caches:
            c[0], c[1] = key, function()
        return caches[0][1]
    p.get_conds_with_caching = get_conds_with_caching
    # the image before, same prompt and tags, with the networks: its conds (text encoder patched) are cached
    assert get_conds_with_caching(lambda: "with networks", ["a cat"], 4, [cache], {"lora": []}) == "with networks"
    glue.mod.EXTRA_NETWORK.activate(p, _params(glue.en, "<lora:ink:1> <lyco:hat:1>"))
    assert len(calls) >= 10 and _same(glue.tm.root, snap)
    assert "out of memory" in p.extra_generation_params["Lora warnings"] and any("not applied" in c for c in p.comments)
    # this image is made without the networks: neither the cached conds of the image before (same key) may
    # serve it, nor may its own network-free conds stay cached for the next one
    assert p.get_conds_with_caching(lambda: "without", ["a cat"], 4, [cache], {"lora": []}) == "without"
    assert cache[0] is None
    glue.mod.EXTRA_NETWORK.deactivate(p)
    monkeypatch.setattr(Patcher, "_write", real)
    glue.mod.EXTRA_NETWORK.activate(p, _params(glue.en, "<lora:ink:1>"))     # the next generation works
    assert not _same(glue.tm.root, snap)
    _next_without_tags_is_base(glue, p, snap)
    # parked (or not), a set change that fails half-way leaves the model at base and the next one works
    glue.mod.EXTRA_NETWORK.activate(p, _params(glue.en, "<lora:ink:1>"))
    glue.mod.EXTRA_NETWORK.deactivate(p)
    calls.clear()
    monkeypatch.setattr(Patcher, "_write", flaky)
    glue.mod.EXTRA_NETWORK.activate(p, _params(glue.en, "<lora:ink:0.5> <lyco:hat:1>"))
    assert _same(glue.tm.root, snap)
    monkeypatch.setattr(Patcher, "_write", real)
    glue.mod.EXTRA_NETWORK.deactivate(p)
    glue.mod.EXTRA_NETWORK.activate(p, _params(glue.en, "<lora:ink:0.5>"))
    _same_as_fresh(glue, [("ink", 0.5)])
    _next_without_tags_is_base(glue, p, snap)


def test_failure_while_taking_kept_networks_out(both, monkeypatch):
    """A tagged image, then one without tags whose apply fails half-way (networks left in the weights are
    being taken out, with lycoris_keep_applied): the warning names the real error, the image is made at
    base, and the next images work."""
    from lib_lycoris.patcher import Patcher
    glue = both
    net = glue.mod.EXTRA_NETWORK
    snap = _snapshot(glue.tm.root)
    p = _p(glue.shared)
    net.activate(p, _params(glue.en, "<lora:ink:1> <lyco:hat:1>"))
    tagged = _snapshot(glue.tm.root)
    net.deactivate(p)
    real, calls = Patcher._write, []
    monkeypatch.setattr(Patcher, "_write", _oom_at_write(5, calls))
    p2 = _p(glue.shared)
    net.activate(p2, _params(glue.en, "<lora:ink:1>"))     # hat taken out: written only when it was kept
    monkeypatch.setattr(Patcher, "_write", real)
    assert len(calls) >= 5
    warning = p2.extra_generation_params["Lora warnings"]
    assert "out of memory" in warning and "KeyError" not in warning, warning
    assert _same(glue.tm.root, snap)
    net.deactivate(p2)
    net.activate(_p(glue.shared), _params(glue.en, "<lora:ink:1> <lyco:hat:1>"))
    assert _same(glue.tm.root, tagged)
    _next_without_tags_is_base(glue, p, snap)


def test_interrupted_scheduled_generation_next_starts_from_base(both):
    """Interrupt/Skip mid-schedule, the host's deactivate never comes: the next activate starts from base."""
    glue = both
    net = glue.mod.EXTRA_NETWORK
    base = _snapshot(glue.tm.root)
    p = _p(glue.shared, steps=6)
    net.activate(p, _params(glue.en, "<lora:ink:0.2@1,1@3,0.5@5>"))
    glue.mod.on_cfg_denoiser(SimpleNamespace(denoiser=SimpleNamespace(step=3, total_steps=6)))   # step 4: weight 1
    assert not _same(glue.tm.root, base)
    net.activate(_p(glue.shared), [])                                   # interrupted; next prompt has no tag
    assert _same(glue.tm.root, base)
    net.activate(_p(glue.shared), _params(glue.en, "<lora:ink:0.2>"))
    first = _snapshot(glue.tm.root)
    net.deactivate(p)
    net.activate(_p(glue.shared, steps=6), _params(glue.en, "<lora:ink:0.2@1,1@3,0.5@5>"))   # step 1 = 0.2
    assert _same(glue.tm.root, first)
    _next_without_tags_is_base(glue, p, base)


def _switch_checkpoint(glue, behind_autograd: bool):
    """A generation with a network (backups kept on a CPU model), then another checkpoint's weights copied
    into the same parameters, as A1111 loads a checkpoint of the same architecture."""
    net = glue.mod.EXTRA_NETWORK
    p = _p(glue.shared)
    net.activate(p, _params(glue.en, "<lora:ink:1>"))
    net.deactivate(p)
    other = tiny_model("sd1", 7)
    with torch.no_grad():
        for (_, a), (_, b) in zip(glue.tm.root.named_parameters(), other.root.named_parameters()):
            (a.data if behind_autograd else a).copy_(b)
    return net, p, other


def test_checkpoint_switch_never_writes_a_stale_backup(both, caplog):
    """Backups kept, then the host loads another checkpoint's weights into the same model object: without
    the tag the model is the new checkpoint bit for bit; with it, the new checkpoint + the network. The
    reload is expected there: no warning about weights changed outside (INFO says what was dropped)."""
    glue = both
    net, p, other = _switch_checkpoint(glue, behind_autograd=False)
    with caplog.at_level("INFO", logger="lycoris"):
        glue.mod.HOST.model_loaded(glue.shared.sd_model)                  # the host's on_model_loaded
    assert not [r for r in caplog.records if r.levelname == "WARNING"], caplog.text
    if glue.shared.opts.lycoris_keep_applied:
        assert "reloaded by the host" in caplog.text
    new_base = _snapshot(glue.tm.root)
    net.activate(p, [])
    assert _same(glue.tm.root, new_base)
    net.activate(p, _params(glue.en, "<lora:ink:1>"))
    from lib_lycoris.network import load_network
    from lib_lycoris.patcher import Patcher, Strength
    Patcher(other.root).apply([(load_network(glue.dir / "ink.safetensors"), Strength(1.0))])
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(glue.tm.root.named_parameters(), other.root.named_parameters()))
    _next_without_tags_is_base(glue, p, new_base)


@pytest.mark.parametrize("behind_autograd", [False, True])
def test_checkpoint_switch_without_the_host_callback(both, behind_autograd):
    """The same, when no model-loaded callback comes: the kept backups' checks (restored) or the parked
    weights' checks (version counter; behind autograd's back, the sample bits) catch it."""
    glue = both
    net, p, other = _switch_checkpoint(glue, behind_autograd=behind_autograd)
    new_base = _snapshot(glue.tm.root)
    net.activate(p, _params(glue.en, "<lora:ink:1>"))
    from lib_lycoris.network import load_network
    from lib_lycoris.patcher import Patcher, Strength
    Patcher(other.root).apply([(load_network(glue.dir / "ink.safetensors"), Strength(1.0))])
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(glue.tm.root.named_parameters(), other.root.named_parameters()))
    _next_without_tags_is_base(glue, p, new_base)


def test_network_file_replaced_on_disk(both):
    """Same name, new content between two generations: the new content applies and the hash changes."""
    glue = both
    net = glue.mod.EXTRA_NETWORK
    p1 = _p(glue.shared)
    net.activate(p1, _params(glue.en, "<lora:ink:1>"))
    w1 = _snapshot(glue.tm.root)
    net.deactivate(p1)
    import os
    path = glue.dir / "ink.safetensors"
    st = os.stat(path)
    make_network(path, glue.tm.root, "lora", seed=99)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    p2 = _p(glue.shared)
    net.activate(p2, _params(glue.en, "<lora:ink:1>"))
    assert not _same(glue.tm.root, w1)
    assert p1.extra_generation_params["Lora hashes"] != p2.extra_generation_params["Lora hashes"]
    assert p2.extra_generation_params["Lora hashes"] == f"ink: {addnet_hash(path)[:12]}"
    _same_as_fresh(glue, [("ink", 1.0)])
    net.deactivate(p2)


def test_export_lora_action_writes_a_card_and_refuses_bad_names(glue):
    """The WebUI's Export LoRA: the prompt's networks (te/unet weights folded) as one file in the networks
    folder, which then appears in the index; existing files and names with folders are refused."""
    from lib_lycoris.errors import LycorisError
    from lib_lycoris.network import load_network
    report = glue.mod.export_current("a cat <lora:ink:0.8> <lyco:hat:1:te=0>", "rank", 4, "baked ink")
    out = glue.dir / "baked ink.safetensors"
    assert out.is_file() and report.units and 0 < report.retained <= 1
    assert "baked ink" in [e.relname for e in glue.mod.HOST.runtime.index.entries()]
    assert load_network(out).modules
    for bad in ("baked ink", "../escape", "sub/x", ""):
        with pytest.raises(LycorisError):
            glue.mod.export_current("<lora:ink:1>", "rank", 4, bad)
    assert not (glue.dir.parent / "escape.safetensors").exists()


def test_parked_networks_same_set_again_writes_nothing(glue):
    """lycoris_keep_applied (default): after a generation the networks stay in the weights; the same set again
    writes no weight, a strength change rewrites from the backups (the bits of a fresh apply), no tag = base."""
    glue.shared.opts.lycoris_keep_applied = True
    net, host = glue.mod.EXTRA_NETWORK, glue.mod.HOST
    base = _snapshot(glue.tm.root)
    p = _p(glue.shared)
    net.activate(p, _params(glue.en, "<lora:ink:0.8> <lyco:hat:1:unet=0.5>"))
    assert host.activation.stats.slots_written > 50
    applied = _snapshot(glue.tm.root)
    net.deactivate(p)
    assert _same(glue.tm.root, applied) and host.activation is None
    p = _p(glue.shared)
    net.activate(p, _params(glue.en, "<lora:ink:0.8> <lyco:hat:1:unet=0.5>"))
    assert host.activation.stats.slots_written == 0 and _same(glue.tm.root, applied)
    assert p.extra_generation_params["Lora hashes"].startswith("ink: ")          # the infotext as ever
    net.deactivate(p)
    net.activate(_p(glue.shared), _params(glue.en, "<lora:ink:0.5>"))
    _same_as_fresh(glue, [("ink", 0.5)])
    _next_without_tags_is_base(glue, _p(glue.shared), base)


def test_parked_networks_leave_a_model_the_host_swaps_out(glue):
    """Parked networks on model A, then the host loads checkpoint B as a new object (A may stay in its
    checkpoint cache): A gets its original bits back at B's model-loaded callback, and B works."""
    glue.shared.opts.lycoris_keep_applied = True
    net, host = glue.mod.EXTRA_NETWORK, glue.mod.HOST
    a = glue.tm
    base_a = _snapshot(a.root)
    p = _p(glue.shared)
    net.activate(p, _params(glue.en, "<lora:ink:1>"))
    net.deactivate(p)
    assert not _same(a.root, base_a)
    b = tiny_model("sd1", 7)
    glue.shared.sd_model = b.root
    host.model_loaded(b.root)
    assert _same(a.root, base_a)
    glue.tm = b
    base_b = _snapshot(b.root)
    net.activate(_p(glue.shared), _params(glue.en, "<lora:ink:1>"))
    _same_as_fresh(glue, [("ink", 1.0)], seed=7)
    _next_without_tags_is_base(glue, _p(glue.shared), base_b)


def test_parked_networks_leave_a_model_reused_from_the_checkpoint_cache(both):
    """A1111 with sd_checkpoints_limit > 1 switches back to a model kept in RAM without a model-loaded callback:
    the model the networks were applied to gets its original bits back when the next activate sees another
    model, whichever way; both models stay exact across A -> B -> A -> B with tags on each."""
    glue = both
    net = glue.mod.EXTRA_NETWORK
    a, b = glue.tm, tiny_model("sd1", 7)
    base = {id(a): _snapshot(a.root), id(b): _snapshot(b.root)}
    for model in (a, b, a, b):
        glue.shared.sd_model, glue.tm = model.root, model
        other = b if model is a else a
        p = _p(glue.shared)
        net.activate(p, _params(glue.en, "<lora:ink:1>"))
        assert _same(other.root, base[id(other)])                 # the last model is clean again
        _same_as_fresh(glue, [("ink", 1.0)], seed=0 if model is a else 7)
        net.deactivate(p)
    _next_without_tags_is_base(glue, _p(glue.shared), base[id(b)])
    assert _same(a.root, base[id(a)])


def test_a_model_the_host_replaced_is_freed_at_its_model_loaded(glue):
    """After on_model_loaded with a new model object nothing of ours keeps the old one alive (Forge reloading
    bf16 -> fp8 kept the old 2.2 GB model until a later garbage collection)."""
    import gc
    import weakref
    net, host = glue.mod.EXTRA_NETWORK, glue.mod.HOST
    p = _p(glue.shared)
    net.activate(p, _params(glue.en, "<lora:ink:1>"))
    net.deactivate(p)
    old = weakref.ref(glue.tm.root)
    glue.tm.root.host_cycle = [glue.tm.root]     # host models are full of reference cycles (Forge's are)
    b = tiny_model("sd1", 7)
    gc.disable()
    try:
        glue.shared.sd_model = b.root
        del p
        glue.tm = None
        host.model_loaded(b.root)
        assert old() is None
    finally:
        gc.enable()
