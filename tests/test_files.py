"""Bad input gets one clear error naming the file and key, and nothing is written or run."""
from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lib_lycoris.errors import (FormatError, LycorisError, NetworkFileError, NonFiniteError,
                                UnsafeFileError)
from lib_lycoris.files import addnet_hash, read_file, read_metadata
from lib_lycoris.network import load_network


def _lora(rank=2, out=8, inn=6) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"lora_unet_conv_in.lora_down.weight": torch.randn(rank, inn, generator=g),
            "lora_unet_conv_in.lora_up.weight": torch.randn(out, rank, generator=g),
            "lora_unet_conv_in.alpha": torch.tensor(1.0)}


def _save(tmp_path: Path, tensors: dict, name="net.safetensors", metadata=None) -> Path:
    p = tmp_path / name
    save_file(tensors, str(p), metadata=metadata)
    return p


def test_good_file_reads_with_metadata(tmp_path):
    p = _save(tmp_path, _lora(), metadata={"ss_output_name": "ink", "ss_base_model_version": "sd_v1"})
    raw = read_file(p)
    assert set(raw.tensors) == set(_lora())
    assert read_metadata(p)["ss_output_name"] == "ink"
    net = load_network(p)
    assert net.base_model == "sd1" and dict(net.algos) == {"lora": 1}
    assert len(addnet_hash(p)) == 64


def test_truncated_file(tmp_path):
    p = _save(tmp_path, _lora())
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - 10])
    with pytest.raises(NetworkFileError) as e:
        load_network(p)
    assert str(p) in str(e.value) and "truncated" in str(e.value)


@pytest.mark.parametrize("cut", [0, 4, 9])
def test_file_too_short(tmp_path, cut):
    p = _save(tmp_path, _lora())
    p.write_bytes(p.read_bytes()[:cut])
    with pytest.raises(NetworkFileError, match="net.safetensors"):
        read_file(p)


def _rewrite_header(p: Path, edit) -> None:
    data = p.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def test_header_lies_about_sizes(tmp_path):
    p = _save(tmp_path, _lora())
    key = "lora_unet_conv_in.lora_up.weight"
    _rewrite_header(p, lambda h: h[key].__setitem__("shape", [9, 2]))
    with pytest.raises(NetworkFileError) as e:
        read_file(p)
    assert e.value.key == key and "bytes" in str(e.value)


def test_header_offsets_outside_file(tmp_path):
    p = _save(tmp_path, _lora())
    key = "lora_unet_conv_in.lora_down.weight"
    _rewrite_header(p, lambda h: h[key].__setitem__("data_offsets", [0, 10 ** 9]))
    with pytest.raises(NetworkFileError) as e:
        read_file(p)
    assert e.value.key == key


def test_header_not_json(tmp_path):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(struct.pack("<Q", 8) + b"{notjson" + b"\0" * 16)
    with pytest.raises(NetworkFileError, match="JSON"):
        read_file(p)


def test_huge_header_length(tmp_path):
    p = tmp_path / "huge.safetensors"
    p.write_bytes(struct.pack("<Q", 2 ** 62) + b"{}")
    with pytest.raises(NetworkFileError, match="header length"):
        read_file(p)


class _Evil:
    def __reduce__(self):
        import os
        return (os.system, ("touch /tmp/lycoris_pwned_marker",))


def test_pickle_with_code_is_refused_and_not_run(tmp_path):
    marker = Path("/tmp/lycoris_pwned_marker")
    marker.unlink(missing_ok=True)
    p = tmp_path / "evil.pt"
    with open(p, "wb") as f:
        pickle.dump({"lora_unet_conv_in.alpha": _Evil()}, f)
    with pytest.raises(UnsafeFileError) as e:
        load_network(p)
    assert str(p) in str(e.value)
    assert not marker.exists()


def test_plain_tensor_pickle_loads(tmp_path):
    p = tmp_path / "net.pt"
    torch.save(_lora(), p)
    assert dict(load_network(p).algos) == {"lora": 1}


def test_unsupported_extension(tmp_path):
    p = tmp_path / "net.gguf"
    p.write_bytes(b"x" * 32)
    with pytest.raises(NetworkFileError, match="unsupported"):
        read_file(p)


def test_missing_file(tmp_path):
    with pytest.raises(NetworkFileError, match="cannot open"):
        read_file(tmp_path / "nope.safetensors")


def test_nan_is_refused(tmp_path):
    t = _lora()
    t["lora_unet_conv_in.lora_up.weight"][0, 0] = float("nan")
    p = _save(tmp_path, t)
    with pytest.raises(NonFiniteError) as e:
        load_network(p)
    assert e.value.key == "lora_unet_conv_in.lora_up.weight" and str(p) in str(e.value)


def test_mixed_adapter_keys_are_an_error_listing_keys(tmp_path):
    t = _lora()
    t["lora_unet_conv_in.hada_w1_a"] = torch.zeros(8, 2)
    with pytest.raises(FormatError) as e:
        load_network(_save(tmp_path, t))
    assert "hada_w1_a" in str(e.value) and "lora_up.weight" in str(e.value)


def test_wrong_rank_shapes(tmp_path):
    t = _lora()
    t["lora_unet_conv_in.lora_up.weight"] = torch.zeros(8, 3)
    with pytest.raises(FormatError) as e:
        load_network(_save(tmp_path, t))
    assert "rank" in str(e.value) and "conv_in" in str(e.value)


def test_unknown_keys_are_reported_not_applied(tmp_path):
    t = _lora()
    t["some_trainer_step_counter"] = torch.tensor(3.0)
    t["bundle_emb.mychar.string_to_param.*"] = torch.zeros(2, 8)
    net = load_network(_save(tmp_path, t))
    assert net.unknown_keys == ["bundle_emb.mychar.string_to_param.*", "some_trainer_step_counter"]


def test_file_with_no_module(tmp_path):
    with pytest.raises(NetworkFileError, match="no network module"):
        load_network(_save(tmp_path, {"junk": torch.zeros(2)}))


def test_every_error_is_a_lycoris_error():
    for cls in (FormatError, NetworkFileError, NonFiniteError, UnsafeFileError):
        assert issubclass(cls, LycorisError)


def test_base_model_from_header_alone(tmp_path):
    from lib_lycoris.network import base_model_of_file
    g = torch.Generator().manual_seed(0)
    sd = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight":
          torch.randn(2, 768, generator=g),
          "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight":
          torch.randn(320, 2, generator=g)}
    assert base_model_of_file(_save(tmp_path, sd))[0] == "sd1"
    assert base_model_of_file(_save(tmp_path, _lora(), "x.safetensors", {"ss_base_model_version": "sdxl_base_v1-0"}))[0] == "sdxl"
    assert base_model_of_file(_save(tmp_path, _lora(), "y.safetensors"))[0] == "unknown"
