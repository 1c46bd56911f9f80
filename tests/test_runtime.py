"""Runtime: one generation's activation; a bad tag is a warning, never an exception."""
from __future__ import annotations

import getpass
import re

import torch
from safetensors.torch import load_file, save_file

from fixtures.models import tiny_model
from lib_lycoris.patcher import Patcher
from lib_lycoris.runtime import NetworkCache, Runtime, te_segments
from lib_lycoris.tags import parse_prompt
from synth import make_network


def test_activate_resolves_loads_and_warns(tmp_path):
    tm = tiny_model("sd1", 0)
    (tmp_path / "styles").mkdir()
    make_network(tmp_path / "styles" / "ink v2.safetensors", tm.root, "lora", limit=20)
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 20)
    rt = Runtime([tmp_path])
    p = Patcher(tm.root)
    snap = {k: v.clone() for k, v in tm.root.named_parameters()}
    act = rt.activate(p, "a cat <lora:styles/ink v2:0.8> <lora:missing:1> <lora:broken:1> <lora::>", steps=4)
    assert act.prompt.split() == ["a", "cat"]
    assert [r.name for r, _ in act.used] == ["styles/ink v2"]
    text = "\n".join(act.warnings)
    assert "missing" in text and "broken" in text, text
    assert act.stats.slots_written == 20
    p.restore()
    assert all(torch.equal(v, snap[k]) for k, v in tm.root.named_parameters())
    # the second load comes from the cache
    rt.load("ink v2")
    assert rt.cache.hits >= 1


def test_cache_evicts_by_budget(tmp_path):
    tm = tiny_model("sd1", 0)
    paths = [make_network(tmp_path / f"n{i}.safetensors", tm.root, "lora", seed=i, limit=10) for i in range(3)]
    cache = NetworkCache(budget_bytes=1)
    for p in paths:
        cache.get(p)
    assert len(cache) == 1 and cache.misses == 3


def test_te_segments_follow_te_schedule():
    reqs = parse_prompt("<lora:a:te=0.1@1,0.6@6> <lora:b:1:unet=0@1,1@3>").requests
    segs = te_segments(reqs, 10)
    assert [(s.start, s.stop) for s in segs] == [(1, 5), (6, 10)]


def test_public_warnings_carry_no_path_and_no_user_name(tmp_path):
    """Issue 14: the infotext (saved in every PNG) and the API get `public_warnings`, never a folder path."""
    tm = tiny_model("sd1", 0)
    root = tmp_path / "Users" / "bob" / "My Models" / "Lora"     # a home folder, a space
    (root / "styles").mkdir(parents=True)
    unk = make_network(root / "unk.safetensors", tm.root, "lora", limit=5)
    tensors = load_file(str(unk))
    tensors["mystery.tensor"] = torch.zeros(2)                      # a key no algorithm claims
    save_file(tensors, str(unk))
    (root / "styles" / "broken v2.safetensors").write_bytes(b"\x00" * 20)
    rt = Runtime([root])
    act = rt.activate(Patcher(tm.root), "a <lora:missing:1> <lora:styles/broken v2:1> <lora:unk:1> "
                      "<lora:/home/bob/x.safetensors:1>", steps=4)
    assert len(act.public_warnings) == len(act.warnings) == 4
    full, public = "\n".join(act.warnings), "\n".join(act.public_warnings)
    # the log and the UI keep the detail
    assert str(root) in full and f"{str(root / 'styles' / 'broken v2.safetensors')!r}" in full
    # the infotext names files by their name in the networks folder
    assert "networks folders ('Lora')" in public
    assert "(file 'styles/broken v2.safetensors')" in public
    assert "unk: 5 modules matched, 1 unknown keys" in public
    assert "'x.safetensors'" in public
    secrets = [part for part in tmp_path.parts if part not in ("/", "")] + ["bob", "My Models", "/home"]
    user = getpass.getuser()
    if len(user) >= 3:
        secrets.append(user)
    for w, p in zip(act.warnings, act.public_warnings):
        assert not any(s in p for s in secrets), (w, p)
        assert not re.search(r"""(^|[\s'"(:])(/|~|[A-Za-z]:[\\/]|\\)""", p), p     # no absolute path left


def test_te_segments_only_for_networks_with_text_encoder_modules(tmp_path):
    """A scheduled UNet-only network (or one that failed) must not make the host encode the prompt once
    per segment (a T5-XXL encode is expensive); one with text-encoder modules does."""
    tm = tiny_model("sd1", 0)
    make_network(tmp_path / "unet_only.safetensors", tm.root, "lora", components=("unet",))
    make_network(tmp_path / "with_te.safetensors", tm.root, "lora")
    rt = Runtime([tmp_path])
    p = Patcher(tm.root)
    assert len(rt.activate(p, "<lora:unet_only:0@1,1@3> <lora:missing:0@1,1@3>", steps=4).te_segments) == 1
    p.restore()
    assert len(rt.activate(p, "<lora:with_te:0@1,1@3>", steps=4).te_segments) == 2
    p.restore()
