"""Patcher contract: exact restore, idempotent apply, minimal re-patching, rollback, merge == bypass."""
from __future__ import annotations

import pytest
import torch

from fixtures.models import tiny_model, unet_inputs
from lib_lycoris.network import load_network
from lib_lycoris.patcher import Patcher, Strength
from lib_lycoris.tags import parse_tag
from synth import TYPES, make_network


def _snapshot(model: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _assert_same(model: torch.nn.Module, snap: dict) -> None:
    for k, v in model.named_parameters():
        assert torch.equal(v.detach(), snap[k]), f"{k} differs"


@pytest.fixture(scope="module")
def sd1():
    return tiny_model("sd1", 0)


@pytest.fixture(scope="module")
def nets(tmp_path_factory, sd1):
    d = tmp_path_factory.mktemp("nets")
    return {k: load_network(make_network(d / f"{k}.safetensors", sd1.root, k, seed=i))
            for i, k in enumerate(TYPES)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_apply_then_restore_is_bit_exact(nets, dtype):
    tm = tiny_model("sd1", 0)
    tm.root.to(dtype)
    snap = _snapshot(tm.root)
    p = Patcher(tm.root)
    p.apply([(n, Strength(0.7)) for n in nets.values()])
    changed = sum(not torch.equal(v.detach(), snap[k]) for k, v in tm.root.named_parameters())
    assert changed > 100, "non-vacuity: the networks changed the model"
    p.restore()
    _assert_same(tm.root, snap)


def test_apply_twice_is_a_noop(nets):
    tm = tiny_model("sd1", 0)
    p = Patcher(tm.root)
    items = [(nets["lora"], Strength(1.0)), (nets["loha"], Strength(0.5))]
    first = p.apply(items)
    snap = _snapshot(tm.root)
    again = p.apply(items)
    assert first.slots_written > 0 and again.slots_written == 0
    _assert_same(tm.root, snap)


def test_strength_change_touches_only_that_network(nets):
    tm = tiny_model("sd1", 0)
    p = Patcher(tm.root)
    lora, ia3 = nets["lora"], nets["ia3"]
    p.apply([(lora, Strength(1.0)), (ia3, Strength(1.0))])
    stats = p.apply([(lora, Strength(1.0)), (ia3, Strength(0.3))])
    assert stats.slots_written == len(p._bindings[id(ia3)].pairs)
    # and the result equals a fresh apply at the new strengths
    fresh = tiny_model("sd1", 0)
    Patcher(fresh.root).apply([(lora, Strength(1.0)), (ia3, Strength(0.3))])
    for (k, a), (_, b) in zip(tm.root.named_parameters(), fresh.root.named_parameters()):
        assert torch.equal(a, b), k


def test_removing_a_network_restores_its_weights(nets):
    tm = tiny_model("sd1", 0)
    snap = _snapshot(tm.root)
    p = Patcher(tm.root)
    p.apply([(nets["lora"], Strength(1.0)), (nets["lokr"], Strength(1.0))])
    p.apply([(nets["lora"], Strength(1.0))])
    p.apply([])
    _assert_same(tm.root, snap)


def test_schedule_touches_weights_only_at_change_points(nets):
    tm = tiny_model("sd1", 0)
    p = Patcher(tm.root)
    req = parse_tag("<lora:x:0.2@1,1.0@3>")
    n = len(p.prepare(nets["lora"]).matched)
    written = [p.apply([(nets["lora"], req)], step=1, total=5).slots_written]
    written += [p.set_step(s, 5) for s in range(2, 6)]
    assert written == [n, 0, n, 0, 0]
    ref = tiny_model("sd1", 0)
    Patcher(ref.root).apply([(nets["lora"], Strength(1.0))])
    for (k, a), (_, b) in zip(tm.root.named_parameters(), ref.root.named_parameters()):
        assert torch.equal(a, b), k


def test_zero_weight_means_off(nets):
    tm = tiny_model("sd1", 0)
    snap = _snapshot(tm.root)
    Patcher(tm.root).apply([(nets["lora-dora"], Strength(0.0))])
    _assert_same(tm.root, snap)


def test_failure_half_way_rolls_back(nets, monkeypatch):
    tm = tiny_model("sd1", 0)
    p = Patcher(tm.root)
    p.apply([(nets["lora"], Strength(1.0))])
    snap = _snapshot(tm.root)
    calls = {"n": 0}
    real = Patcher._write

    def flaky(self, slot, items):
        calls["n"] += 1
        if calls["n"] == 40:
            raise MemoryError("simulated out of memory")
        return real(self, slot, items)
    monkeypatch.setattr(Patcher, "_write", flaky)
    with pytest.raises(MemoryError):
        p.apply([(nets["lora"], Strength(0.5)), (nets["loha"], Strength(1.0))])
    monkeypatch.setattr(Patcher, "_write", real)
    _assert_same(tm.root, snap)
    p.restore()


@pytest.mark.parametrize("first", [True, False])
def test_failure_inside_a_write_leaves_no_half_written_weight(nets, monkeypatch, first):
    """The failing weight itself is garbage when the error comes (a kernel dying half-way): still exact."""
    import lib_lycoris.patcher as patcher_mod
    tm = tiny_model("sd1", 0)
    p = Patcher(tm.root)
    if not first:
        p.apply([(nets["lora"], Strength(1.0))])
    snap = _snapshot(tm.root)
    ptrs = {k: v.data_ptr() for k, v in tm.root.named_parameters()}
    calls = {"n": 0}
    real = patcher_mod.write_lora      # every write of a plain LoRA, first or from a kept lane

    def dying(w2, base2, up, down, alpha, holds_base):
        calls["n"] += 1
        if calls["n"] == 25:
            w2.fill_(float("nan"))
            raise RuntimeError("simulated kernel failure")
        return real(w2, base2, up, down, alpha, holds_base)
    monkeypatch.setattr(patcher_mod, "write_lora", dying)
    with pytest.raises(RuntimeError):
        p.apply([(nets["lora"], Strength(0.5))])
    monkeypatch.setattr(patcher_mod, "write_lora", real)
    assert calls["n"] >= 25
    _assert_same(tm.root, snap)
    assert {k: v.data_ptr() for k, v in tm.root.named_parameters()} == ptrs
    p.restore()


@pytest.mark.parametrize("dropped", [["lora"], ["loha"], ["lora", "loha"]])
def test_failure_while_dropping_networks_rolls_back_to_them(nets, monkeypatch, dropped):
    """An apply that takes networks out (the next image without their tags, after they were left in the
    weights) fails half-way: the error is the original one, and the weights are as before, dropped networks
    included (a rollback needs their contributions after the set has let them go); the next apply works."""
    tm = tiny_model("sd1", 0)
    base = _snapshot(tm.root)
    p = Patcher(tm.root, keep_backups=True)
    both = [(nets["lora"], Strength(0.8)), (nets["loha"], Strength(0.6))]
    p.apply(both)
    before = _snapshot(tm.root)
    real, calls = Patcher._write, []

    def dying(self, slot, items):
        calls.append(1)
        if len(calls) == 12:
            self._ensure_backup(slot)
            slot.view().fill_(float("nan"))                  # the write died half-way
            raise RuntimeError("simulated: out of memory")
        return real(self, slot, items)
    kept = [item for item in both if not any(item[0] is nets[k] for k in dropped)]
    monkeypatch.setattr(Patcher, "_write", dying)
    with pytest.raises(RuntimeError, match="simulated"):
        p.apply(kept)
    monkeypatch.setattr(Patcher, "_write", real)
    assert len(calls) > 12
    _assert_same(tm.root, before)
    p.apply(kept)
    fresh = tiny_model("sd1", 0)
    Patcher(fresh.root).apply(kept)
    for (k, a), (_, b) in zip(tm.root.named_parameters(), fresh.root.named_parameters()):
        assert torch.equal(a, b), k
    p.restore()
    _assert_same(tm.root, base)


def test_kept_backups_are_reused_only_while_the_weights_are_untouched(nets):
    """keep_backups: restore keeps the backups (A1111 keeps its own for the model's life) and the next apply
    writes in place; a weight changed by someone else since (through the parameter, or behind autograd's
    back through .data) is backed up anew, so a restore never brings back stale bits."""
    tm = tiny_model("sd1", 0)
    snap = _snapshot(tm.root)
    ptrs = {k: v.data_ptr() for k, v in tm.root.named_parameters()}
    p = Patcher(tm.root, keep_backups=True)
    p.apply([(nets["lora"], Strength(1.0))])
    backups = {k: s.backup.data_ptr() for k, s in p._slots.items()}
    p.restore()
    _assert_same(tm.root, snap)
    held = p.extra_memory()
    factors = sum(c.nbytes() for c in p._compiled.values())    # the last set's converted factors, kept too
    assert factors > 0
    assert held > 0 and held == factors + sum(t.numel() * t.element_size() for t in (k.backup for k in p._kept.values()))
    p.apply([(nets["lora"], Strength(0.5))])
    assert {k: s.backup.data_ptr() for k, s in p._slots.items()} == backups     # reused, not copied again
    fresh = tiny_model("sd1", 0)
    Patcher(fresh.root).apply([(nets["lora"], Strength(0.5))])
    for (k, x), (_, y) in zip(tm.root.named_parameters(), fresh.root.named_parameters()):
        assert torch.equal(x, y), k
    p.restore()
    # someone else changes two weights between generations
    names = sorted(backups)[:2]                               # slots are keyed by weight name
    with torch.no_grad():
        tm.root.get_parameter(names[0]).mul_(2.0)                 # bumps the version counter
        tm.root.get_parameter(names[1]).data.mul_(3.0)            # does not: caught by the sample check
    changed = _snapshot(tm.root)
    p.apply([(nets["lora"], Strength(1.0))])
    p.restore()
    _assert_same(tm.root, changed)
    assert {k: v.data_ptr() for k, v in tm.root.named_parameters()} == ptrs   # tensors never replaced
    assert p.release_backups() > 0 and p.extra_memory() == 0
    q = Patcher(tm.root, keep_backups=False)
    q.apply([(nets["lora"], Strength(1.0))])
    q.restore()
    assert q.extra_memory() == 0
    _assert_same(tm.root, changed)


def test_restore_after_the_host_replaced_a_patched_tensor(nets):
    """A host that moves or reloads a parameter while patched (param.data = new tensor): restore copies
    the original bits into the host's tensor instead of swapping ours back."""
    tm = tiny_model("sd1", 0)
    snap = _snapshot(tm.root)
    p = Patcher(tm.root)
    p.apply([(nets["lora"], Strength(1.0))])
    moved = [k for k, v in tm.root.named_parameters() if not torch.equal(v, snap[k])]
    hosts = {}
    for k in moved[:5]:
        param = tm.root.get_parameter(k)
        param.data = param.data.clone()            # e.g. module.to(other device) and back
        hosts[k] = param.data.data_ptr()
    p.apply([(nets["lora"], Strength(0.5))])        # writes into the host's tensors
    p.restore()
    _assert_same(tm.root, snap)
    assert all(tm.root.get_parameter(k).data_ptr() == ptr for k, ptr in hosts.items())


@pytest.mark.parametrize("kind", [t for t in TYPES if t != "norm"])
def test_bypass_equals_merge(nets, kind):
    """The UNet output with forward hooks equals the output with merged weights (every adapter type)."""
    tm = tiny_model("sd1", 0)
    inputs = unet_inputs("sd1", batch=2)
    with torch.no_grad():
        plain = tm.unet(**inputs).sample
        p = Patcher(tm.root)
        p.apply([(nets[kind], Strength(0.8), "merge")])
        merged = tm.unet(**inputs).sample
        p.restore()
        snap = _snapshot(tm.root)
        p.apply([(nets[kind], Strength(0.8), "bypass")])
        _assert_same(tm.root, snap)        # bypass writes no Linear/Conv weight
        bypass = tm.unet(**inputs).sample
        p.restore()
        after = tm.unet(**inputs).sample
    assert not torch.allclose(plain, merged, atol=1e-4), "non-vacuity: the network changes the output"
    torch.testing.assert_close(bypass, merged, rtol=1e-4, atol=1e-4)
    assert torch.equal(after, plain)


def test_bypass_strength_follows_schedule_without_rewriting(nets):
    tm = tiny_model("sd1", 0)
    inputs = unet_inputs("sd1", batch=1)
    p = Patcher(tm.root)
    req = parse_tag("<lora:x:0.5@1,1@2>")
    with torch.no_grad():
        p.apply([(nets["lora"], req, "bypass")], step=1, total=2)
        a = tm.unet(**inputs).sample
        assert p.set_step(2, 2) == 0
        b = tm.unet(**inputs).sample
        p.restore()
        ref = Patcher(tm.root)
        ref.apply([(nets["lora"], Strength(1.0))])
        c = tm.unet(**inputs).sample
        ref.restore()
    assert not torch.allclose(a, b)
    torch.testing.assert_close(b, c, rtol=1e-4, atol=1e-4)


def test_backup_on_cpu_equals_backup_on_device(nets):
    a, b = tiny_model("sd1", 0), tiny_model("sd1", 0)
    Patcher(a.root).apply([(nets["loha"], Strength(0.6))])
    pb = Patcher(b.root, backup="cpu")
    pb.apply([(nets["loha"], Strength(0.6))])
    for (k, x), (_, y) in zip(a.root.named_parameters(), b.root.named_parameters()):
        assert torch.equal(x, y), k
    assert pb.extra_memory() > 0


def test_block_weights_reach_modules(nets):
    """`in=0` leaves the input blocks untouched; `out=0` the output blocks."""
    tm = tiny_model("sd1", 0)
    snap = _snapshot(tm.root)
    Patcher(tm.root).apply([(nets["lora"], parse_tag("<lora:x:1:in=0>"))])
    changed = {k for k, v in tm.root.named_parameters() if not torch.equal(v, snap[k])}
    assert not any(".input_blocks." in k for k in changed)
    assert any(".output_blocks." in k for k in changed) and any(".middle_block." in k for k in changed)
    assert any("cond_stage_model" in k for k in changed)


def test_te_and_unet_weights(nets):
    tm = tiny_model("sd1", 0)
    snap = _snapshot(tm.root)
    Patcher(tm.root).apply([(nets["lora"], parse_tag("<lora:x:1:0>"))])
    changed = {k for k, v in tm.root.named_parameters() if not torch.equal(v, snap[k])}
    assert changed and all(k.startswith("cond_stage_model") for k in changed)


def test_bare_unet_and_compute_in_weight_dtype(nets, tmp_path):
    """A bare UNet is recognised; compute='weight' stays within one rounding of the float32 path."""
    a, b = tiny_model("sd1", 0), tiny_model("sd1", 0)
    a.unet.to(torch.bfloat16)
    b.unet.to(torch.bfloat16)
    net = load_network(make_network(tmp_path / "u.safetensors", a.root, "lora", components=("unet",)))
    snap = _snapshot(a.unet)
    pa = Patcher(a.unet)
    pa.apply([(net, Strength(1.0))])
    Patcher(b.unet, compute="weight").apply([(net, Strength(1.0))])
    eps = torch.finfo(torch.bfloat16).eps
    changed = 0
    for (k, x), (_, y) in zip(a.unet.named_parameters(), b.unet.named_parameters()):
        assert (x.float() - y.float()).abs().max() <= 2 * eps * x.float().abs().max() + 1e-6, k
        changed += not torch.equal(x, snap[k])
    assert changed > 50
    pa.restore()
    _assert_same(a.unet, snap)


@pytest.mark.parametrize("n", [1, 2, 17, 2**25 + 3])
def test_kept_backup_sample_spans_the_whole_weight(n):
    """The staleness sample reaches the first and the last element at any size (float index math does not)."""
    from lib_lycoris.patcher import SAMPLES, sample_bits
    t = torch.zeros(n, dtype=torch.uint8)
    t[-1] = 7
    s = sample_bits([t])[0]
    assert s.numel() == min(SAMPLES, n) and int(s[-1]) == 7 and int(s[:-1].sum()) == 0


def test_in_place_first_write_equals_a_rewrite_from_the_backup(nets):
    """A first apply updates the weight in place (it holds the original bits); a later rewrite reads the
    backup. Both must give the same bits, or a set would depend on the path that led to it."""
    a, b = tiny_model("sd1", 0), tiny_model("sd1", 0)
    items = [(nets["lora"], Strength(0.8))]
    Patcher(a.root).apply(items)                     # in place
    pb = Patcher(b.root)
    pb.apply([(nets["lora"], Strength(0.3))])
    pb.apply(items)                                  # from the backup
    n = 0
    for (k, x), (_, y) in zip(a.root.named_parameters(), b.root.named_parameters()):
        assert torch.equal(x, y), k
        n += 1
    assert n > 100


def test_inference_tensors(nets):
    """Forge builds its model under torch.inference_mode(): its parameters have no version counter. Apply,
    restore, the kept backups and their staleness check must work on them (inside inference mode, as there)."""
    with torch.inference_mode():
        tm = tiny_model("sd1", 0)
        assert next(tm.root.parameters()).is_inference()
        snap = {k: v.clone() for k, v in tm.root.named_parameters()}
        p = Patcher(tm.root, keep_backups=True)
        for s in (1.0, 0.5):
            p.apply([(nets["lora"], Strength(s)), (nets["loha"], Strength(s))])
            assert not all(torch.equal(v, snap[k]) for k, v in tm.root.named_parameters())
            p.restore()
            assert all(torch.equal(v, snap[k]) for k, v in tm.root.named_parameters())
        assert p.extra_memory() > 0
        name = next(iter(p._kept))                   # kept backups are keyed by weight name
        tm.root.get_parameter(name).mul_(2.0)          # changed behind our back: caught by the samples
        changed = {k: v.clone() for k, v in tm.root.named_parameters()}
        p.apply([(nets["lora"], Strength(1.0))])
        p.restore()
        assert all(torch.equal(v, changed[k]) for k, v in tm.root.named_parameters())


def test_sample_bits_batches_mixed_dtypes_and_devices_views():
    """One gather per element size: raw bits of the first, evenly spaced and last elements of each tensor
    (fp32, fp16, bf16, float8, int8; tiny and non-multiple sizes), NaN and −0 compared as stored."""
    from lib_lycoris.patcher import SAMPLES, sample_bits
    ts = [torch.randn(7, 13), torch.randn(300).half(), torch.randn(5).bfloat16(), torch.zeros(0),
          torch.randn(40, 3).to(torch.float8_e4m3fn), torch.arange(-50, 50, dtype=torch.int8)]
    ts[0][0, 0] = float("nan")
    ts[1][-1] = -0.0
    got = sample_bits(ts)
    for t, bits in zip(ts, got):
        flat = t.reshape(-1)
        n = flat.numel()
        assert bits.numel() == min(SAMPLES, n) and bits.device.type == "cpu"
        if n:
            assert bits.element_size() == t.element_size()
            assert int(bits[-1]) == int(flat[-1:].view(bits.dtype)[0])
            step = max(1, (n - 1) // (SAMPLES - 1))
            assert torch.equal(bits, flat.view(bits.dtype)[n - 1 - (bits.numel() - 1) * step::step])
    again = sample_bits([t.clone() for t in ts])
    assert all(torch.equal(a, b) for a, b in zip(got, again))            # NaN, −0: equal as bits
    ts[1][-1] = 0.0
    assert not torch.equal(sample_bits([ts[1]])[0], got[1])                 # +0 is another bit pattern


def test_parked_weights_are_checked_at_the_next_apply(nets):
    """park() leaves the networks in the weights; the next apply checks them in one batch: a weight someone
    rewrote (through the parameter, or behind autograd through .data) is forgotten without a write and the
    networks are applied to its new value; a tensor the host only moved (new storage, same bits) stays ours.
    The same set again writes nothing; restore is exact throughout."""
    tm = tiny_model("sd1", 0)
    items = [(nets["lora"], Strength(0.8)), (nets["loha"], Strength(0.5))]
    p = Patcher(tm.root, keep_backups=True)
    p.apply(items)
    p.park()
    assert p.apply(items).slots_written == 0
    p.park()
    names = sorted(p._slots)[:3]
    with torch.no_grad():
        tm.root.get_parameter(names[0]).mul_(2.0)                        # new version, same storage
        tm.root.get_parameter(names[1]).data.add_(1.0)                   # behind autograd: sample bits
        moved = tm.root.get_parameter(names[2])
        moved.data = moved.data.clone()                                  # the host moved it: still ours
    new_base = {k: v.detach().clone() for k, v in tm.root.named_parameters()}
    assert p.verify() == 2
    p.apply(items)
    fresh = tiny_model("sd1", 0)
    with torch.no_grad():
        for n in names[:2]:
            fresh.root.get_parameter(n).copy_(new_base[n])               # the rewritten weights are the new base
    Patcher(fresh.root).apply(items)
    for (k, a), (_, b) in zip(tm.root.named_parameters(), fresh.root.named_parameters()):
        assert torch.equal(a, b), k
    p.restore()
    base = _snapshot(tiny_model("sd1", 0).root)
    for n in names[:2]:
        base[n] = new_base[n]
    _assert_same(tm.root, base)


def test_strength_change_follows_a_moved_weight(nets):
    """A strength change or step switch of one LoRA writes from its kept lane (two ops per weight); the host
    moving a weight (new storage, same bits) between two generations must not leave the lane writing into
    the old storage: the new storage gets the new strength, the old one is untouched, restore is exact."""
    tm = tiny_model("sd1", 0)
    base = _snapshot(tm.root)
    p = Patcher(tm.root, keep_backups=True)
    p.apply([(nets["lora"], Strength(0.5))])
    p.apply([(nets["lora"], Strength(0.7))])          # the lanes are in use from here
    p.park()
    names = sorted(p._slots)
    old = {}
    with torch.no_grad():
        for n in names[::2]:
            param = tm.root.get_parameter(n)
            old[n] = param.data
            param.data = param.data.clone()
    frozen = {n: t.clone() for n, t in old.items()}
    assert p.verify() == 0                            # moved, not rewritten: still ours
    p.apply([(nets["lora"], Strength(1.0))])
    fresh = tiny_model("sd1", 0)
    Patcher(fresh.root).apply([(nets["lora"], Strength(1.0))])
    for (k, a), (_, b) in zip(tm.root.named_parameters(), fresh.root.named_parameters()):
        assert torch.equal(a, b), k
    for n, t in old.items():
        assert torch.equal(t, frozen[n]), n           # nothing written into a storage the host left
    p.restore()
    _assert_same(tm.root, base)


def test_compiled_factors_are_kept_for_the_same_set_only(nets):
    """restore keeps the last set's converted factors (with kept backups), so the same set again converts
    nothing; an apply with another set drops them; release_backups frees them."""
    tm = tiny_model("sd1", 0)
    p = Patcher(tm.root, keep_backups=True)
    p.apply([(nets["lora"], Strength(1.0))])
    p.restore()
    held = {id(f[0]) for c in p._compiled.values() for f in c.factors.values() if f is not None}
    assert held
    p.apply([(nets["lora"], Strength(0.5))])
    assert {id(f[0]) for c in p._compiled.values() for f in c.factors.values() if f is not None} == held
    p.restore()
    p.apply([(nets["loha"], Strength(1.0))])
    assert all(c.network is nets["loha"] for c in p._compiled.values())
    p.restore()
    assert p.release_backups() > 0 and not p._compiled and p.extra_memory() == 0
