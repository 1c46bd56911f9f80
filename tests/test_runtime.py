"""Runtime: one generation's activation; a bad tag is a warning, never an exception."""
from __future__ import annotations

import torch

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
