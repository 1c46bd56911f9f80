"""`python -m lib_lycoris inspect|merge|schedule` end to end."""
from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fixtures import oracle as O
from fixtures.models import tiny_model
from lib_lycoris.cli import main
from lib_lycoris.network import load_network
from lib_lycoris.patcher import Patcher, Strength

ROOT = Path(__file__).resolve().parent.parent


def _run(*argv) -> tuple:
    out = io.StringIO()
    rc = main(list(argv), out=out)
    return rc, out.getvalue()


def test_inspect_json_names_types_and_base_model():
    rc, out = _run("inspect", str(O.oracle("sdxl-loha-fp16", 1.0).path), "--json")
    info = json.loads(out)
    assert rc == 0 and info["base_model"] == "sdxl" and info["algos"] == {"loha": info["modules"]}
    assert set(info["components"]) == {"unet", "te1", "te2"}
    assert info["unknown_keys"] == []


def test_inspect_text_and_bad_file(tmp_path):
    rc, out = _run("inspect", str(O.oracle("sd1-lokr", 1.0).path))
    assert rc == 0 and "base model: sd1" in out and "lokr" in out
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x01" * 30)
    rc, _ = _run("inspect", str(bad))
    assert rc == 2


def _checkpoint(tmp_path: Path, dtype=torch.float16) -> Path:
    tm = tiny_model("sd1", 0)
    sd = {k: v.detach().to(dtype).contiguous() for k, v in tm.root.state_dict().items()}
    p = tmp_path / "model.safetensors"
    save_file(sd, str(p), metadata={"note": "tiny"})
    return p


def test_merge_equals_patcher_and_keeps_layout_dtype_metadata(tmp_path):
    model = _checkpoint(tmp_path)
    lora = O.oracle("sd1-lora", 1.0).path
    loha = O.oracle("sd1-loha", 1.0).path
    out = tmp_path / "merged.safetensors"
    rc, text = _run("merge", str(model), f"{lora}:0.7", f"{loha}:0.4", "-o", str(out), "--device", "cpu")
    assert rc == 0, text
    with safe_open(str(out), framework="pt") as f:
        merged = {k: f.get_tensor(k) for k in f.keys()}
        assert f.metadata()["note"] == "tiny" and "lycoris_merged" in f.metadata()
    with safe_open(str(model), framework="pt") as f:
        assert set(f.keys()) == set(merged)
    tm = tiny_model("sd1", 0)
    tm.root.to(torch.float16)
    Patcher(tm.root).apply([(load_network(lora), Strength(0.7)), (load_network(loha), Strength(0.4))])
    changed = 0
    for k, v in tm.root.state_dict().items():
        assert merged[k].dtype == torch.float16
        assert torch.equal(merged[k], v), k
        changed += not torch.equal(merged[k], tm.root.state_dict()[k]) or True
    assert changed


def test_merge_on_openclip_layout(tmp_path):
    tm = tiny_model("sd2", 0)
    p = tmp_path / "sd2.safetensors"
    save_file({k: v.detach().contiguous() for k, v in tm.root.state_dict().items()}, str(p))
    on = O.oracle("sd2-lora", 1.0)
    out = tmp_path / "o.safetensors"
    rc, text = _run("merge", str(p), str(on.path), "-o", str(out), "--device", "cpu")
    assert rc == 0, text
    with safe_open(str(out), framework="pt") as f:
        for name, parts in O.original_reference(on).items():
            got = f.get_tensor(name).double()
            for rows, ref in parts:
                g = got if rows is None else got[rows]
                assert (g - ref).abs().max() <= 2e-6 * ref.abs().max(), name


def test_module_entry_point_schedule():
    r = subprocess.run([sys.executable, "-m", "lib_lycoris", "schedule", "<lora:a:1:start=3>", "--steps", "5",
                        "--json"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert "0" in r.stdout and data


# --------------------------------------------------------------------------------------------------
# merge: strict by default (issue 14), clear errors for bad model / output files, atomic output

def _net(tmp_path: Path, name: str = "net", limit: int = 6) -> Path:
    """A synthetic LoRA on the tiny SD1 model (its first `limit` weights; conv_in first)."""
    from synth import make_network
    return make_network(tmp_path / f"{name}.safetensors", tiny_model("sd1", 0).root, "lora", limit=limit)


def _misfit(tmp_path: Path) -> tuple:
    """(network, module label, delta shape, weight shape): a LoRA whose conv_in has twice the out-dimension."""
    from safetensors.torch import load_file
    t = load_file(str(_net(tmp_path, "good")))
    key = "lora_unet_conv_in.lora_up.weight"
    t[key] = torch.cat([t[key], t[key]])
    bad = tmp_path / "misfit.safetensors"
    save_file(t, str(bad))
    down = t["lora_unet_conv_in.lora_down.weight"]
    rest = tuple(down.shape[1:])
    return bad, "unet:conv_in", (t[key].shape[0],) + rest, (t[key].shape[0] // 2,) + rest


def _errors(caplog) -> list:
    return [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]


def test_merge_refuses_a_module_that_does_not_fit(tmp_path, caplog):
    model = _checkpoint(tmp_path)
    bad, label, delta, weight = _misfit(tmp_path)
    before = set(tmp_path.iterdir())
    out = tmp_path / "merged.safetensors"
    rc, _ = _run("merge", str(model), str(bad), "-o", str(out), "--device", "cpu")
    assert rc != 0 and not out.exists() and set(tmp_path.iterdir()) == before
    (msg,) = _errors(caplog)
    line = next(x for x in msg.splitlines() if label in x)
    assert str(bad) in line and str(delta) in line and str(weight) in line, msg
    assert "--allow-partial" in msg


def test_merge_refuses_a_module_the_model_lacks(tmp_path, caplog):
    from safetensors.torch import load_file
    model = _checkpoint(tmp_path)
    t = load_file(str(_net(tmp_path)))
    t["lora_unet_no_such_block.lora_down.weight"] = torch.zeros(4, 8)
    t["lora_unet_no_such_block.lora_up.weight"] = torch.zeros(8, 4)
    net = tmp_path / "extra.safetensors"
    save_file(t, str(net))
    out = tmp_path / "merged.safetensors"
    rc, _ = _run("merge", str(model), str(net), "-o", str(out), "--device", "cpu")
    assert rc != 0 and not out.exists()
    (msg,) = _errors(caplog)
    assert f"{net}: unet:no_such_block: no such module in the model" in msg, msg


def test_merge_allow_partial_writes_the_rest_and_lists_what_it_left_out(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="lycoris")
    model = _checkpoint(tmp_path)
    bad, label, delta, weight = _misfit(tmp_path)
    out = tmp_path / "merged.safetensors"
    rc, text = _run("merge", str(model), str(bad), "-o", str(out), "--device", "cpu", "--allow-partial")
    assert rc == 0, text
    assert "1 skipped (shape)" in text and "1 module(s) left out" in text
    (skip,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert str(bad) in skip and label in skip and str(delta) in skip and str(weight) in skip
    conv_in = "model.diffusion_model.input_blocks.0.0.weight"
    with safe_open(str(out), framework="pt") as f, safe_open(str(model), framework="pt") as m:
        assert torch.equal(f.get_tensor(conv_in), m.get_tensor(conv_in))       # left out
        changed = [k for k in f.keys() if k != conv_in and not torch.equal(f.get_tensor(k), m.get_tensor(k))]
    assert len(changed) == 5   # the other modules of the network were merged


def test_merge_state_dict_strict_raises_typed_error_and_leaves_sd_untouched(tmp_path):
    from lib_lycoris.errors import PartialMergeError
    from lib_lycoris.merge import merge_state_dict
    bad, label, _, _ = _misfit(tmp_path)
    sd = {k: v.detach().clone() for k, v in tiny_model("sd1", 0).root.state_dict().items()}
    ref = {k: v.clone() for k, v in sd.items()}
    try:
        merge_state_dict(sd, [(load_network(bad), Strength(1.0))], device="cpu")
    except PartialMergeError as e:
        assert [(p[0], p[1]) for p in e.problems] == [(str(bad), label)]
    else:
        raise AssertionError("a strict merge with a misfit module did not raise")
    assert all(torch.equal(sd[k], ref[k]) for k in ref)


def test_merge_bad_model_file_gives_one_line_and_writes_nothing(tmp_path, caplog):
    good = _checkpoint(tmp_path)
    net = _net(tmp_path)
    data = good.read_bytes()
    cases = {"truncated.safetensors": data[: len(data) // 2], "cut_in_header.safetensors": data[:100],
             "garbage.safetensors": b"\x01" * 30, "model.ckpt": data}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
    (tmp_path / "folder.safetensors").mkdir()
    before = set(tmp_path.iterdir())
    for name in list(cases) + ["folder.safetensors", "missing.safetensors"]:
        caplog.clear()
        out = tmp_path / "merged.safetensors"
        rc, _ = _run("merge", str(tmp_path / name), str(net), "-o", str(out), "--device", "cpu")
        (msg,) = _errors(caplog)
        assert rc != 0 and str(tmp_path / name) in msg and "\n" not in msg, (name, msg)
        assert set(tmp_path.iterdir()) == before, name


def test_merge_truncated_model_has_no_traceback(tmp_path):
    good = _checkpoint(tmp_path)
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(good.read_bytes()[:-64])
    r = subprocess.run([sys.executable, "-m", "lib_lycoris", "merge", str(bad), str(_net(tmp_path)), "-o",
                        str(tmp_path / "o.safetensors")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and str(bad) in r.stderr, r.stderr
    assert not (tmp_path / "o.safetensors").exists()


def test_merge_unwritable_output_gives_a_clear_message(tmp_path, caplog):
    model = _checkpoint(tmp_path)
    net = _net(tmp_path)
    for out in (tmp_path / "no_such_folder" / "o.safetensors", tmp_path):
        caplog.clear()
        rc, _ = _run("merge", str(model), str(net), "-o", str(out), "--device", "cpu")
        (msg,) = _errors(caplog)
        assert rc != 0 and str(out) in msg and "\n" not in msg, msg


def test_merge_failure_while_writing_leaves_the_old_output(tmp_path, caplog, monkeypatch):
    import errno

    import safetensors.torch

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    model = _checkpoint(tmp_path)
    net = _net(tmp_path)
    out = tmp_path / "merged.safetensors"
    out.write_bytes(b"old")
    before = set(tmp_path.iterdir())
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    rc, _ = _run("merge", str(model), str(net), "-o", str(out), "--device", "cpu")
    assert rc != 0 and out.read_bytes() == b"old" and set(tmp_path.iterdir()) == before
    (msg,) = _errors(caplog)
    assert "No space left on device" in msg and str(out) in msg, msg


# --- export / extract / resize (#13; the maths is tests/test_export.py's) ------------------------------

def test_export_help_states_what_a_megabyte_counts():
    buf = io.StringIO()
    import contextlib
    with contextlib.redirect_stdout(buf), __import__("pytest").raises(SystemExit):
        main(["export", "--help"])
    text = " ".join(buf.getvalue().split())
    assert "1 MB = 10^6 bytes" in text and "lora_down/lora_up" in text and "--exact" in text


def test_export_missing_network_has_no_traceback_and_no_output(tmp_path):
    r = subprocess.run([sys.executable, "-m", "lib_lycoris", "export", str(tmp_path / "nope.safetensors"),
                        "-o", str(tmp_path / "o.safetensors"), "--rank", "4"], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "nope.safetensors" in r.stderr, r.stderr
    assert list(tmp_path.iterdir()) == []


def test_resize_and_extract_commands(tmp_path):
    net = _net(tmp_path, limit=12)
    out = tmp_path / "small.safetensors"
    rc, text = _run("resize", str(net), "-o", str(out), "--rank", "2", "--device", "cpu")
    assert rc == 0 and "resize: 12 modules" in text, text
    assert {v.shape[0] for k, v in load_file_items(out) if k.endswith("lora_down.weight")} == {2}
    base = _checkpoint(tmp_path, torch.float32)
    tuned = tmp_path / "tuned.safetensors"
    with safe_open(str(base), framework="pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    key = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    sd[key] = sd[key] + 0.1 * torch.ones_like(sd[key])                  # a rank-1 change
    save_file(sd, str(tuned))
    rc, text = _run("extract", str(tuned), str(base), "-o", str(tmp_path / "x.safetensors"), "--rank", "1",
                    "--device", "cpu", "--dtype", "fp32")
    assert rc == 0 and "extract: 1 modules" in text and "te1: text encoder unchanged" in text, text


def load_file_items(path: Path) -> list:
    with safe_open(str(path), framework="pt") as f:
        return [(k, f.get_tensor(k)) for k in f.keys()]
