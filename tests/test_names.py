"""Network name resolution: stems, sub-folder paths, aliases, unicode, and names that try to escape."""
from __future__ import annotations

import os
import unicodedata
from pathlib import Path
from typing import Optional

import pytest

from lib_lycoris.errors import NameResolutionError, TagError
from lib_lycoris.names import NetworkIndex, normalize_name


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "Lora"
    touch(root / "plain.safetensors")
    touch(root / "styles" / "ink v2.safetensors")
    touch(root / "styles" / "my.lora.v1.5.safetensors")
    touch(root / "chars" / "猫 スタイル.pt")
    touch(root / "a" / "dup.safetensors")
    touch(root / "b" / "dup.ckpt")
    touch(root / "old.bin")
    touch(root / "Mixed Case.safetensors")
    touch(root / "notes.txt")
    touch(tmp_path / "secret.safetensors")
    return root


ALIASES = {"plain.safetensors": "Plain Alias", "old.bin": "ink v2", "dup.ckpt": "shared", "ink v2.safetensors":
           "shared"}


def read_alias(path: Path) -> Optional[str]:
    return ALIASES.get(path.name)


@pytest.mark.parametrize("name,relpath", [
    ("plain", "plain.safetensors"),
    ("plain.safetensors", "plain.safetensors"),
    ("styles/ink v2", "styles/ink v2.safetensors"),
    ("styles\\ink v2", "styles/ink v2.safetensors"),
    ("./styles//ink v2", "styles/ink v2.safetensors"),
    ("ink v2", "styles/ink v2.safetensors"),  # stem beats the alias 'ink v2' of old.bin
    ("my.lora.v1.5", "styles/my.lora.v1.5.safetensors"),
    ("猫 スタイル", "chars/猫 スタイル.pt"),
    ("a/dup", "a/dup.safetensors"),
    ("b/dup.ckpt", "b/dup.ckpt"),
    ("Plain Alias", "plain.safetensors"),
    ("mixed case", "Mixed Case.safetensors"),
    ("  plain  ", "plain.safetensors"),
])
def test_resolve(tree: Path, name: str, relpath: str) -> None:
    index = NetworkIndex([tree], read_alias=read_alias)
    assert index.resolve(name) == tree / relpath


@pytest.mark.parametrize("name,words", [
    ("", "empty"),
    ("   ", "empty"),
    ("../secret", "outside"),
    ("styles/../../secret", "outside"),
    ("/etc/passwd", "absolute"),
    ("C:\\x\\y", "absolute"),
    ("~/x", "absolute"),
    ("dup", "several"),
    ("shared", "several"),
    ("nothere", "no network"),
    ("notes", "no network"),
])
def test_resolve_errors(tree: Path, name: str, words: str) -> None:
    index = NetworkIndex([tree], read_alias=read_alias)
    with pytest.raises(NameResolutionError) as info:
        index.resolve(name)
    assert words in str(info.value)
    assert isinstance(info.value, TagError)


def test_suggestion(tree: Path) -> None:
    with pytest.raises(NameResolutionError, match="did you mean 'plain'"):
        NetworkIndex([tree]).resolve("plian")


def test_entries(tree: Path) -> None:
    entries = NetworkIndex([tree], read_alias=read_alias).entries()
    rel = [e.relpath for e in entries]
    assert "notes.txt" not in rel and len(rel) == 8
    ink = next(e for e in entries if e.stem == "ink v2")
    assert (ink.relpath, ink.relname, ink.alias) == ("styles/ink v2.safetensors", "styles/ink v2", "shared")


def test_nfd_names(tmp_path: Path) -> None:
    root = tmp_path / "n"
    touch(root / (unicodedata.normalize("NFD", "café") + ".safetensors"))
    index = NetworkIndex([root])
    assert index.resolve(unicodedata.normalize("NFC", "café")).name.endswith(".safetensors")
    assert normalize_name(unicodedata.normalize("NFD", "é")) == "é"


def test_roots_in_order(tmp_path: Path) -> None:
    first, second = tmp_path / "1", tmp_path / "2"
    touch(first / "x.safetensors")
    touch(second / "x.safetensors")
    touch(second / "only.safetensors")
    index = NetworkIndex([first, second, tmp_path / "missing"])
    assert index.resolve("x.safetensors") == first / "x.safetensors"
    assert index.resolve("only") == second / "only.safetensors"
    assert any("does not exist" in w for w in index.warnings)


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symlinks")
def test_symlinks_out_are_rejected(tmp_path: Path) -> None:
    root = tmp_path / "Lora"
    outside = touch(tmp_path / "outside" / "evil.safetensors")
    touch(root / "real.safetensors")
    try:
        (root / "evil.safetensors").symlink_to(outside)
        (root / "linkdir").symlink_to(outside.parent, target_is_directory=True)
        (root / "inside.safetensors").symlink_to(root / "real.safetensors")
    except OSError:
        pytest.skip("cannot create symlinks here")
    index = NetworkIndex([root])
    assert {e.relpath for e in index.entries()} == {"real.safetensors", "inside.safetensors"}
    assert any("outside" in w for w in index.warnings)
    for name in ("evil", "linkdir/evil"):
        with pytest.raises(NameResolutionError):
            index.resolve(name)
    assert index.resolve("inside") == root / "inside.safetensors"
    # a file replaced by an escaping symlink after the scan is caught at resolve time
    (root / "real.safetensors").unlink()
    (root / "real.safetensors").symlink_to(outside)
    with pytest.raises(NameResolutionError, match="outside"):
        index.resolve("real")


def test_read_alias_errors_are_reported(tree: Path) -> None:
    def broken(path: Path) -> Optional[str]:
        raise OSError("cannot open")

    index = NetworkIndex([tree], read_alias=broken)
    assert len(index.entries()) == 8
    assert any("cannot read the alias" in w for w in index.warnings)


def test_rescan(tree: Path) -> None:
    index = NetworkIndex([tree])
    touch(tree / "new one.safetensors")
    with pytest.raises(NameResolutionError):
        index.resolve("new one")
    index.rescan()
    assert index.resolve("new one") == tree / "new one.safetensors"
