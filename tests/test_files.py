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


@pytest.mark.parametrize("writer,error", [
    (lambda obj, f: torch.save(obj, f), UnsafeFileError),   # torch's zip format: the weights-only unpickler refuses
    (lambda obj, f: pickle.dump(obj, f), NetworkFileError),  # a bare pickle: refused as not a torch zip file
])
def test_pickle_with_code_is_refused_and_not_run(tmp_path, writer, error):
    marker = Path("/tmp/lycoris_pwned_marker")
    marker.unlink(missing_ok=True)
    p = tmp_path / "evil.pt"
    with open(p, "wb") as f:
        writer({"lora_unet_conv_in.alpha": _Evil()}, f)
    with pytest.raises(error) as e:
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


# --- what tests/test_fuzz.py found (issue #14, Harden): each was another exception, a hang or a giant
# allocation before its fix, and is now the project's own error (or a loaded network) ------------------------

def _raw_header(tmp_path: Path, text: bytes, data: bytes = b"", name="raw.safetensors") -> Path:
    p = tmp_path / name
    p.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return p


@pytest.mark.parametrize("text,words", [
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),                                   # was RecursionError
    (b'{"a": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 0]}}', "not valid JSON"),
    (b'{"a": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}', "unknown dtype"),    # was TypeError
    (b'{"a": {"dtype": "F32", "shape": [true], "data_offsets": [0, 4]}}', "bad shape"),
    (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
     b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', "same key twice"),     # was loaded
    (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
     b'"__metadata__": {"x": "1", "x": "2"}}', "same key twice"),
])
def test_malformed_headers(tmp_path, text, words):
    p = _raw_header(tmp_path, text, b"\0" * 8)
    for reader in (read_file, read_metadata, load_network):
        with pytest.raises(NetworkFileError, match=words):
            reader(p)


@pytest.mark.parametrize("data", [b"", b"abc", struct.pack("<Q", 2 ** 63 - 1) + b"{}", struct.pack("<Q", 2 ** 53)])
def test_addnet_hash_of_a_broken_file(tmp_path, data):
    p = tmp_path / "broken.safetensors"
    p.write_bytes(data)   # was struct.error (short), OSError / ValueError (seek past 2**63)
    with pytest.raises(NetworkFileError, match="header length"):
        addnet_hash(p)


def test_addnet_hash_unchanged_for_good_files(tmp_path):
    import hashlib
    p = _save(tmp_path, _lora())
    data = p.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    assert addnet_hash(p) == hashlib.sha256(data[8 + n:]).hexdigest()


def _torch_zip(tensors: dict, edit=None) -> bytes:
    """torch.save bytes, optionally with `edit(records)` applied to the archive's records (rewritten as a valid
    zip: torch's reader checks no CRC, so a corrupt record reaches its unpickler)."""
    import io
    import zipfile
    buf = io.BytesIO()
    torch.save(tensors, buf)
    if edit is None:
        return buf.getvalue()
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    records = {i.filename: src.read(i) for i in src.infolist()}
    edit(records)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as dst:
        for n, d in records.items():
            dst.writestr(n, d)
    return out.getvalue()


def test_truncated_pickles_inside_a_valid_zip(tmp_path):
    # torch's weights-only unpickler raises struct.error, IndexError, EOFError, ... on these
    full = _torch_zip(_lora())
    import io
    import zipfile
    pkl = next(n for n in zipfile.ZipFile(io.BytesIO(full)).namelist() if n.endswith("data.pkl"))
    size = len(zipfile.ZipFile(io.BytesIO(full)).read(pkl))
    p = tmp_path / "cut.pt"
    for cut in range(size):
        p.write_bytes(_torch_zip(_lora(), lambda r: r.__setitem__(pkl, r[pkl][:cut])))
        with pytest.raises(NetworkFileError):
            read_file(p)


def test_legacy_torch_format_is_refused(tmp_path):
    # The legacy format allocates each storage at the size its pickle states before reading any data.
    p = tmp_path / "old.pt"
    torch.save(_lora(), p, _use_new_zipfile_serialization=False)
    with pytest.raises(NetworkFileError, match="legacy format"):
        read_file(p)


def test_zip_record_claiming_more_than_the_file_is_refused_without_allocating(tmp_path):
    from test_fuzz import guarded   # an address-space limit: the allocation fails the test instead of the machine

    data = bytearray(_torch_zip(_lora()))
    central = data.index(b"PK\x01\x02")   # first central directory record: its uncompressed size at +24
    data[central + 24:central + 28] = struct.pack("<I", 2 ** 31 - 1)
    p = tmp_path / "liar.pt"
    p.write_bytes(bytes(data))
    with guarded():
        with pytest.raises(NetworkFileError, match="claims 2147483647 bytes"):
            read_file(p)


def test_unsafe_pickle_detail_names_the_global(tmp_path):
    p = tmp_path / "evil.pt"
    torch.save({"x": _Evil()}, p)
    with pytest.raises(UnsafeFileError, match="GLOBAL posix.system|GLOBAL nt.system"):
        read_file(p)


def test_float8_network_loads_and_its_nan_is_refused(tmp_path):
    t = {k: v.to(torch.float8_e4m3fn) if v.dim() else v for k, v in _lora().items()}
    net = load_network(_save(tmp_path, t))   # was NotImplementedError: isfinite on float8
    assert dict(net.algos) == {"lora": 1}
    t["lora_unet_conv_in.lora_up.weight"] = t["lora_unet_conv_in.lora_up.weight"].float()
    t["lora_unet_conv_in.lora_up.weight"][0, 0] = float("nan")
    t["lora_unet_conv_in.lora_up.weight"] = t["lora_unet_conv_in.lora_up.weight"].to(torch.float8_e5m2)
    with pytest.raises(NonFiniteError):
        load_network(_save(tmp_path, t, "nan.safetensors"))


M = "lora_unet_conv_in"


@pytest.mark.parametrize("tensors,words", [   # each was an IndexError or AttributeError while building
    ({f"{M}.oft_blocks": torch.zeros(2, 4, 4), f"{M}.alpha": torch.zeros(0)}, "alpha must be a scalar"),
    ({f"{M}.weight": torch.ones(8), f"{M}.on_input": torch.zeros(0)}, "on_input must be a scalar"),
    ({**_lora(), f"{M}.scale": torch.zeros(0)}, "scale must be a scalar"),
    ({f"{M}.oft_blocks": torch.zeros(2, 4, 4), f"{M}.rescale": torch.tensor(1.0)}, "rescale"),
    ({f"{M}.a1.weight": torch.zeros(6, 2), f"{M}.a2.weight": torch.zeros(2), f"{M}.b1.weight": torch.zeros(8, 2),
      f"{M}.b2.weight": torch.zeros(2, 6)}, "GLoRA factors must be 2-D or 4-D"),
    ({f"{M}.diff": torch.tensor(1.0)}, "diff is a scalar"),
    ({f"{M}.diff": torch.zeros(8, 6), f"{M}.diff_b": torch.tensor(1.0)}, "diff_b () is not a bias vector"),
    ({f"{M}.lokr_w1": torch.zeros(2, 2), f"{M}.lokr_w1_b": torch.tensor(1.0), f"{M}.lokr_w2": torch.zeros(4, 3)},
     "LoKr factors must be 2-D or 4-D"),
    ({f"{M}.w_norm": torch.tensor(1.0)}, "w_norm / b_norm must be vectors"),
])
def test_adapters_with_scalars_where_tensors_belong(tmp_path, tensors, words):
    with pytest.raises(FormatError, match=words.replace("(", r"\(").replace(")", r"\)")):
        load_network(_save(tmp_path, tensors))


def _peft_file(tmp_path: Path, config) -> Path:
    g = torch.Generator().manual_seed(0)
    t = {"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.randn(4, 16, generator=g),
         "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.randn(32, 4, generator=g)}
    raw = config if isinstance(config, str) else json.dumps(config, allow_nan=True)
    return _save(tmp_path, t, "peft.safetensors", {"lora_adapter_metadata": raw})


@pytest.mark.parametrize("config,words", [
    ({"unet.lora_alpha": "x"}, "alpha 'x' is not a finite"),                       # was ValueError
    ({"unet.lora_alpha": [8]}, "alpha [8] is not a finite"),                       # was TypeError
    ({"unet.lora_alpha": float("inf")}, "alpha inf is not a finite"),              # was scale inf
    ({"unet.lora_alpha": 10 ** 400}, "is not a finite"),                           # was OverflowError
    ({"unet.lora_alpha": -4}, "is not a finite non-negative"),
    ({"unet.lora_alpha": 8, "unet.alpha_pattern": ["proj_in"]}, "is not an object"),   # was AttributeError
    ({"unet.lora_alpha": 8, "unet.alpha_pattern": {"(": 2}}, "is not a regular expression"),   # was re.error
    # patterns of the shapes that backtrack for hours ('(.*.*.*.*.*.*.*.*)*x' did in tests/test_fuzz.py); these
    # two are quick on this module path, refused all the same
    ({"unet.lora_alpha": 8, "unet.alpha_pattern": {"(a*)*$": 2}}, "too complex"),
    ({"unet.lora_alpha": 8, "unet.alpha_pattern": {".*.*.*.*x": 2}}, "too complex"),
])
def test_bad_peft_configs(tmp_path, config, words):
    with pytest.raises(FormatError, match=words.replace("[", r"\[").replace("]", r"\]")):
        load_network(_peft_file(tmp_path, config))


@pytest.mark.parametrize("config,scale", [
    ({"unet.lora_alpha": 8}, 2.0),
    ({"unet.lora_alpha": 8, "unet.alpha_pattern": {"proj_in": 2}}, 0.5),
    ({"unet.lora_alpha": 8, "unet.alpha_pattern": {"down_blocks.0.attentions.0.proj_in": 2}}, 0.5),
    ({"unet.lora_alpha": 8, "unet.alpha_pattern": {"attentions\\.0\\.proj_.*": 2}}, 0.5),
    ({"unet.lora_alpha": 8, "unet.alpha_pattern": {"to_k|proj_in": 2}}, 0.5),      # grouped as PEFT does
    ({"unet.lora_alpha": 8, "unet.alpha_pattern": {".*attentions.*proj_in": 2}}, 0.5),
    ({"unet.lora_alpha": 8, "unet.alpha_pattern": {"to_k": 2}}, 2.0),
    ("[" * 50_000 + "]" * 50_000, 1.0),   # not a config: warned, scale 1 (was RecursionError)
])
def test_peft_configs_that_still_work(tmp_path, config, scale):
    net = load_network(_peft_file(tmp_path, config))
    (module,) = net.modules.values()
    assert module.scale == scale


def test_header_values_are_quoted_briefly(tmp_path):
    long = "X" * 1_000_000
    p = _raw_header(tmp_path, json.dumps({long: {"dtype": long, "shape": [1], "data_offsets": [0, 4]}}).encode(),
                    b"\0" * 4)
    with pytest.raises(NetworkFileError, match="unknown dtype") as e:
        read_file(p)
    assert len(str(e.value)) < 1000


def test_a_shape_of_a_million_huge_sizes_is_refused_at_once(tmp_path):
    from test_fuzz import guarded   # a deadline: the product of all the sizes took minutes

    shape = [2 ** 63 - 1] * 300_000
    p = _raw_header(tmp_path, json.dumps({"a": {"dtype": "F32", "shape": shape, "data_offsets": [0, 4]}}).encode(),
                    b"\0" * 4)
    with guarded():
        with pytest.raises(NetworkFileError, match="more than the file"):
            read_file(p)


@pytest.mark.parametrize("tensors", [   # were ZeroDivisionError (alpha / rank) and IndexError (GLoRA's size)
    {f"{M}.lora_down.weight": torch.zeros(0, 6), f"{M}.lora_up.weight": torch.zeros(8, 0),
     f"{M}.alpha": torch.tensor(1.0)},
    {f"{M}.hada_w1_a": torch.zeros(8, 0), f"{M}.hada_w1_b": torch.zeros(0, 6), f"{M}.hada_w2_a": torch.zeros(8, 0),
     f"{M}.hada_w2_b": torch.zeros(0, 6), f"{M}.alpha": torch.tensor(1.0)},
    {f"{M}.lokr_w1": torch.zeros(2, 2), f"{M}.lokr_w2_a": torch.zeros(4, 0), f"{M}.lokr_w2_b": torch.zeros(0, 3),
     f"{M}.alpha": torch.tensor(1.0)},
    {f"{M}.a1.weight": torch.zeros(6, 0), f"{M}.a2.weight": torch.zeros(0, 6), f"{M}.b1.weight": torch.zeros(8, 0),
     f"{M}.b2.weight": torch.zeros(0, 6)},
])
def test_rank_zero_modules(tmp_path, tensors):
    with pytest.raises(FormatError, match="rank 0"):
        load_network(_save(tmp_path, tensors))
