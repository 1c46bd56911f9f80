"""Our merged weights against the official LyCORIS package and PEFT/diffusers (the oracles).

Every case is a network made and saved by the official code on a tiny real architecture; the reference
is the official module's forward behaviour in float64 (fixtures/oracle.py). We load the file, patch the
model and compare every parameter: changed ones to the reference, all others unchanged. Both model
layouts are checked (diffusers names and the original single-file names, OpenCLIP q/k/v included).
"""
from __future__ import annotations

import pytest
import torch

from fixtures import oracle as O
from fixtures.models import tiny_model
from lib_lycoris.network import load_network
from lib_lycoris.patcher import Patcher, Strength

# We compute in float32 against a float64 reference: relative to the largest reference value.
RTOL = 2e-6


def _cases():
    for cid in O.CASE_IDS:
        case = O.CASE_BY_ID[cid]
        mults = O.MULTIPLIERS if case.source == "lycoris" or (
            case.algo in ("lora", "loha", "lokr") and not case.options.get("use_dora")) else (1.0,)
        for m in mults:
            yield pytest.param(cid, m, id=f"{cid}@{m}")


def _assert_close(got: torch.Tensor, ref: torch.Tensor, name: str, precision: str = "float64") -> None:
    """Relative to the largest reference value; 10x looser where the official code can only run in
    float32 (OFT/BOFT `get_r`, see fixtures/oracle.py)."""
    scale = ref.abs().max().item() + 1e-12
    err = (got.double() - ref.double()).abs().max().item() / scale
    tol = RTOL if precision == "float64" else 10 * RTOL
    assert err < tol, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("case_id,mult", list(_cases()))
def test_diffusers_layout_matches_oracle(case_id, mult):
    on = O.oracle(case_id, mult)
    tm = tiny_model(on.arch, 0)
    tm.diffusers.double()
    net = load_network(on.path)
    before = {k: v.detach().clone() for k, v in tm.diffusers.named_parameters()}
    stats = Patcher(tm.diffusers).apply([(net, Strength(mult))])
    report = stats.reports[0]
    assert not report.unmatched and not report.skipped and not report.unknown_keys, report.summary()
    params = dict(tm.diffusers.named_parameters())
    assert on.reference, "vacuous case: the oracle changed nothing"
    for k, ref in on.reference.items():
        assert not torch.equal(ref, on.base[k]) or mult == 0, f"{k}: reference equals base"
        _assert_close(params[k].detach(), ref, k, on.precision)
    for k, v in params.items():
        if k not in on.reference:
            assert torch.equal(v.detach(), before[k]), f"{k} changed but the oracle says it should not"


ORIGINAL = [pytest.param(c, id=c) for c in O.CASE_IDS if O.CASE_BY_ID[c].source == "lycoris"
            and (O.CASE_BY_ID[c].arch != "sd1" or c in ("sd1-lora", "sd1-loha", "sd1-lokr", "sd1-norm"))]


@pytest.mark.parametrize("case_id", ORIGINAL)
def test_original_layout_matches_oracle(case_id):
    """The same files on the A1111/Forge layout: LDM/SGM UNet names, OpenCLIP fused q/k/v."""
    on = O.oracle(case_id, 1.0)
    tm = tiny_model(on.arch, 0)
    tm.root.double()
    net = load_network(on.path)
    stats = Patcher(tm.root).apply([(net, Strength(1.0))])
    report = stats.reports[0]
    assert not report.unmatched and not report.skipped, report.summary()
    params = dict(tm.root.named_parameters())
    for name, parts in O.original_reference(on).items():
        for rows, ref in parts:
            got = params[name].detach()
            got = got if rows is None else got[rows]
            _assert_close(got, ref, name, on.precision)


def test_base_model_detected():
    # The diffusers SD1 file has no metadata and the tiny model's widths are no real SD width: 'unknown'
    # is the honest answer there; the SDXL one has a second text encoder.
    for cid, arch in (("sd1-lora", "sd1"), ("sd2-lora", "sd2"), ("sdxl-lora", "sdxl"),
                      ("sd1-diffusers-lora", "unknown"), ("sdxl-diffusers-lora", "sdxl")):
        net = load_network(O.oracle(cid, 1.0).path)
        assert net.base_model == arch, (cid, net.base_model, net.base_model_reason)


def test_sd1_network_on_sdxl_model_reports_mismatch():
    """An SD1 network on SDXL: names partly coincide, shapes do not; nothing half-applies silently."""
    on = O.oracle("sd1-lora", 1.0)
    tm = tiny_model("sdxl", 0)
    before = {k: v.detach().clone() for k, v in tm.root.named_parameters()}
    net = load_network(on.path)
    p = Patcher(tm.root)
    from lib_lycoris.errors import ModelMismatchError
    try:
        report = p.prepare(net)
    except ModelMismatchError as e:
        assert "sdxl" in str(e)
    else:
        assert report.unmatched or report.skipped
        assert "made for sd1, model is sdxl" in report.summary()
        p.apply([(net, Strength(1.0))])
        p.restore()
    for k, v in tm.root.named_parameters():
        assert torch.equal(v.detach(), before[k]), k


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case_id", ["sd1-lora", "sd1-loha-dora", "sd2-boft", "sdxl-lokr-bf16"])
def test_half_precision_models(case_id, dtype):
    """fp16/bf16 weights: deltas computed in float32, one rounding to the weight's dtype."""
    on = O.oracle(case_id, 1.0)
    tm = tiny_model(on.arch, 0)
    tm.diffusers.to(dtype)
    Patcher(tm.diffusers).apply([(load_network(on.path), Strength(1.0))])
    params = dict(tm.diffusers.named_parameters())
    eps = torch.finfo(dtype).eps
    for k, ref in on.reference.items():
        got = params[k].detach()
        assert got.dtype == dtype
        # the rounding of the half-precision base weight, carried through the delta, and one final rounding
        err = (got.double() - ref).abs().max().item()
        assert err <= 4 * eps * ref.abs().max().item(), f"{k}: {err:.2e}"


def test_dylora_dyn_slices_ranks():
    """`dyn=N` uses the first N ranks with the full-rank scale (A1111's rule)."""
    on = O.oracle("sd1-dylora", 1.0)
    net = load_network(on.path)
    mod = next(m for m in net.modules.values() if m.adapter.down.shape[0] > 1)
    c_full, c_1 = mod.contribution(None), mod.contribution(1)
    w = torch.zeros(mod.adapter.out_features(), mod.adapter.numel() // mod.adapter.out_features())
    up, down = mod.adapter.factors(w.device)
    expect = (up[:, :1] @ down[:1]) * mod.scale
    got = c_1.weight_delta(w.reshape(-1, *([1] * 0)).reshape(w.shape), 1.0)
    assert torch.allclose(got.reshape(expect.shape), expect)
    assert not torch.allclose(c_full.weight_delta(w, 1.0).reshape(expect.shape), expect)
