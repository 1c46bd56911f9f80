"""Network name resolution: stems, sub-folder paths, aliases, unicode, and names that try to escape."""
from __future__ import annotations

import os
import unicodedata
from pathlib import Path
from typing import Optional

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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


# --- names that try to escape: lookalikes, invisible and control characters (issue #14, Harden) -------------
# Resolution looks names up in the index of files found inside the folders and never joins a name to a path,
# so no name can reach outside; these names are refused outright, with a message that says why.

@pytest.mark.parametrize("name,words", [
    ("..\uff0fsecret", "looks like '../secret'"),            # FULLWIDTH SOLIDUS
    ("..\u2215secret", "looks like '../secret'"),            # DIVISION SLASH
    ("..\u2044secret", "looks like '../secret'"),            # FRACTION SLASH
    ("..\u29f8secret", "looks like '../secret'"),            # BIG SOLIDUS
    ("..\uff3csecret", "looks like '../secret'"),            # FULLWIDTH REVERSE SOLIDUS
    ("..\u2216secret", "looks like '../secret'"),            # SET MINUS (a backslash lookalike)
    ("\uff0e\uff0e/secret", "looks like '../secret'"),       # FULLWIDTH FULL STOP
    ("\u2024\u2024/secret", "looks like '../secret'"),       # ONE DOT LEADER
    ("\u2025/secret", "looks like '../secret'"),             # TWO DOT LEADER (NFKC: '..')
    ("\ufe52\ufe52/secret", "looks like '../secret'"),       # SMALL FULL STOP
    ("\u3002\u3002/secret", "looks like '../secret'"),       # IDEOGRAPHIC FULL STOP
    ("\u00b7\u00b7/secret", "looks like '../secret'"),       # MIDDLE DOT
    ("\u0701\u0701/secret", "looks like '../secret'"),       # SYRIAC SUPRALINEAR FULL STOP (homoglyph dot)
    ("\ua60e\ua60e/secret", "looks like '../secret'"),       # VAI FULL STOP (homoglyph dot)
    (".\u0307./secret", "looks like '../secret'"),           # a combining mark on a dot
    ("styles/\uff0e\uff0e/\uff0e\uff0e/secret", "outside"),
    ("\uff0fetc/passwd", "looks like '/etc/passwd'"),
    ("\u2215etc", "absolute"),
    ("\uff23\uff1a\uff0fx", "looks like 'C:/x'"),             # FULLWIDTH C, COLON, SOLIDUS
    ("\uff43\uff1a", "absolute"),
    (".. /secret", "outside"),                               # Windows drops trailing spaces and dots:
    ("... /secret", "outside"),                              # '.. ' and '...' would mean '..'
    ("styles/.../x", "outside"),
    ("\\\\server\\share\\x", "absolute"),
    ("\\\\?\\C:\\x", "absolute"),
    ("c:x", "absolute"),
    ("real\x00", "control character U+0000"),
    ("\x00", "control character"),
    ("re\x1bal", "control character U+001B"),
    ("re\x85al", "control character U+0085"),
    ("\u202ereal", "invisible character U+202E RIGHT-TO-LEFT OVERRIDE"),
    ("real\u202e", "U+202E"),
    ("\u2066real\u2069", "U+2066"),
    ("\u200ereal", "U+200E"),
    ("\u00adreal", "U+00AD"),
    ("\ufeffreal", "U+FEFF"),
    ("\u200dreal", "U+200D ZERO WIDTH JOINER"),              # a joiner joins nothing at the start ...
    ("real\u200c", "U+200C"),                                # ... or the end
    ("..\u200d/secret", "U+200D"),                           # ... or next to a dot
    ("re\ud800al", "U+D800"),                                # a lone surrogate
])
def test_lookalikes_and_invisible_characters_are_refused(tree: Path, name: str, words: str) -> None:
    index = NetworkIndex([tree], read_alias=read_alias)
    with pytest.raises(NameResolutionError) as info:
        index.resolve(name)
    assert words in str(info.value)
    assert "no network called" not in str(info.value)


@pytest.mark.parametrize("filename,name", [
    ("作品\uff0fキャラ.safetensors", "作品\uff0fキャラ"),          # '／' where Windows forbids '/'
    ("\uff21\uff1aテスト.safetensors", "\uff21\uff1aテスト"),      # 'Ａ：' not followed by a separator
    ("初音\u30fbミク.safetensors", "初音\u30fbミク"),
    ("l\u00b7l.safetensors", "l\u00b7l"),
    ("سبک\u200cنقاشی.safetensors", "سبک\u200cنقاشی"),             # Persian needs the zero-width non-joiner
    ("\u2764\ufe0f\u200d\U0001f525.safetensors", "\u2764\ufe0f\u200d\U0001f525"),   # an emoji ZWJ sequence
    ("v1.5.safetensors", "v1.5"),
    ("...dots.safetensors", "...dots"),
])
def test_lookalikes_inside_names_still_resolve(tmp_path: Path, filename: str, name: str) -> None:
    root = tmp_path / "Lora"
    touch(root / filename)
    assert NetworkIndex([root]).resolve(name) == root / filename


def test_a_lookalike_named_file_resolves_only_to_itself(tmp_path: Path) -> None:
    # a folder literally named '．．' inside the networks folder is a folder like any other
    root = tmp_path / "Lora"
    touch(root / "x\uff0fy.safetensors")
    touch(tmp_path / "y.safetensors")
    index = NetworkIndex([root])
    assert index.resolve("x\uff0fy") == root / "x\uff0fy.safetensors"
    with pytest.raises(NameResolutionError, match="no network"):
        index.resolve("x/y")


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symlinks")
def test_symlink_loops_and_chains(tmp_path: Path) -> None:
    root = tmp_path / "Lora"
    outside = touch(tmp_path / "outside.safetensors")
    touch(root / "real.safetensors")
    try:
        (root / "loop.safetensors").symlink_to(root / "loop.safetensors")
        (root / "ping.safetensors").symlink_to(root / "pong.safetensors")
        (root / "pong.safetensors").symlink_to(root / "ping.safetensors")
        (root / "hop.safetensors").symlink_to("sub/out.safetensors")      # inside -> inside -> outside
        (root / "sub").mkdir()
        (root / "sub" / "out.safetensors").symlink_to(Path("..") / ".." / "outside.safetensors")
        (root / "rel.safetensors").symlink_to(Path("..") / "Lora" / "real.safetensors")   # out and back in
    except OSError:
        pytest.skip("cannot create symlinks here")
    assert outside.exists()
    index = NetworkIndex([root])   # a loop is reported, not raised
    assert {e.relpath for e in index.entries()} == {"real.safetensors", "rel.safetensors"}
    assert any("loop.safetensors" in w for w in index.warnings)
    for name in ("loop", "ping", "pong", "hop", "sub/out"):
        with pytest.raises(NameResolutionError):
            index.resolve(name)
    assert index.resolve("rel") == root / "rel.safetensors"
    # replaced by a loop after the scan: refused at resolve time, not a RuntimeError
    (root / "real.safetensors").unlink()
    (root / "real.safetensors").symlink_to(root / "real.safetensors")
    with pytest.raises(NameResolutionError, match="symlink"):
        index.resolve("real")


_PATHY = "./\\:~ \x00\u200d\u202e\uff0f\uff0e\u2215\u2044\u2024\u2025\uff3c\uff1a\u3002\u00b7\u0307abCs"


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.text(alphabet=_PATHY, max_size=14) | st.text(max_size=10))
def test_any_name_resolves_inside_or_is_refused(tree: Path, name: str) -> None:
    index = NetworkIndex([tree], read_alias=read_alias)
    try:
        path = index.resolve(name)
    except NameResolutionError:
        return
    assert path.resolve().is_relative_to(tree.resolve())
