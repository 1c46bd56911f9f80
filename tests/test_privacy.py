"""public_text: no absolute path and no user name in texts bound for the infotext and the API."""
from __future__ import annotations

import string
from pathlib import PurePosixPath, PureWindowsPath

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lib_lycoris.privacy import public_text

LORA = "/home/bob/stable-diffusion-webui/models/Lora"
LYCO_WIN = r"C:\Users\bob\sd\models\LyCORIS"
SPACED = "/home/bob smith/My Models/Lora"
ROOTS = (LORA, LYCO_WIN, SPACED)

CASES = [
    # the line: the networks folders named by their last part
    (f"<lora:x> skipped: no network called 'x' in the networks folders ({LORA!r}, {LYCO_WIN!r})",
     "<lora:x> skipped: no network called 'x' in the networks folders ('Lora', 'LyCORIS')"),
    # errors.py `file=`: quoted, inside a folder -> the path below it (spaces kept)
    (f"file too short (file '{LORA}/styles/ink v2.safetensors', key 'k')",
     "file too short (file 'styles/ink v2.safetensors', key 'k')"),
    (f"bad (file {LYCO_WIN + chr(92) + 'sub' + chr(92) + 'n.pt'!r})", "bad (file 'sub/n.pt')"),   # repr: '\\'
    ("x (file 'C:\\Users\\bob\\sd\\models\\LyCORIS\\sub\\n.pt')", "x (file 'sub/n.pt')"),             # plain '\'
    (r"c:\users\BOB\sd\models\lycoris\sub\n.pt", "sub/n.pt"),                                         # case
    ('"/home/bob/stable-diffusion-webui/models/Lora/it\'s.pt"', '"it\'s.pt"'),
    # bare, inside a folder; trailing punctuation kept outside
    (f"cannot read {LORA}/a.pt.", "cannot read a.pt."),
    (f"in {SPACED}/styles/ink.pt now", "in styles/ink.pt now"),
    (f"({LORA})", "(Lora)"),
    (f"{LORA}2/x.pt", "x.pt"),                            # a sibling folder is not the folder
    # any other absolute path -> its last part
    ("'/home/bob smith/other dir/x.pt'", "'x.pt'"),
    ("cannot read (/etc/passwd).", "cannot read (passwd)."),
    ("C:/Users/bob/Downloads/y.pt, z", "y.pt, z"),
    (r"see D:\AI\x.pt", "see x.pt"),
    (r"\\server\share\bob\x.pt", "x.pt"),
    ("'~/secret/x.pt' and ~/y.pt", "'x.pt' and y.pt"),
    ("'~bob/x.pt'", "'x.pt'"),
    # home folders -> '~'
    ("~bob", "~"),
    ("'~'", "'~'"),
    ("/root and /home/bob/ and /Users/alice.", "~ and ~ and ~."),
    (r"C:\Users\bob", "~"),
    ("'C:\\\\Users\\\\bob'", "'~'"),
    ("/export/home/bob", "~"),
    ("/home/users/x.pt", "x.pt"),                         # a user called 'users'
    # a tag quoting a path
    ("'<lora:/home/bob/x:1>': names are relative", "'<lora:x:1>': names are relative"),
    # no absolute path: unchanged
    ("<lora:styles/ink v2:0.8> te1/te2 1/2 and/or", "<lora:styles/ink v2:0.8> te1/te2 1/2 and/or"),
    ("'0.5~10': bad schedule; '~5' is not a number", "'0.5~10': bad schedule; '~5' is not a number"),
    ("ink: 20 modules matched, 3 unknown keys; made for sd1, model is sdxl",
     "ink: 20 modules matched, 3 unknown keys; made for sd1, model is sdxl"),
    ("networks folder 'models/Lora' does not exist", "networks folder 'models/Lora' does not exist"),
    ("'/'", "'/'"),
    ("", ""),
]


@pytest.mark.parametrize("text,public", CASES)
def test_public_text(text: str, public: str) -> None:
    assert public_text(text, ROOTS) == public


def test_roots_accept_paths_and_ignore_relative_ones() -> None:
    text = f"(file '{LORA}/a.pt')"
    assert public_text(text, [PurePosixPath(LORA)]) == "(file 'a.pt')"
    assert public_text(rf"'{LYCO_WIN}\b\c.pt'", [PureWindowsPath(LYCO_WIN)]) == "'b/c.pt'"
    assert public_text(text, ["models/Lora"]) == "(file 'a.pt')"      # not a root: the file name
    assert public_text(text) == "(file 'a.pt')"
    assert public_text(f"read {LORA}/a.pt.") == "read a.pt."


def test_nested_roots_take_the_deepest() -> None:
    assert public_text(f"'{LORA}/sub/x.pt'", [LORA, LORA + "/sub"]) == "'x.pt'"


_FRAME = "cannot read net.safetensors: gone"     # the text around the path: no user name in it
_NAME = st.text(string.ascii_letters + string.digits + " ._-", min_size=1, max_size=12).filter(
    lambda s: s.strip(" .") == s and s not in (".", ".."))


@settings(max_examples=200, deadline=None)
@given(user=st.text(string.ascii_lowercase, min_size=4, max_size=10).filter(lambda u: u not in _FRAME),
       parts=st.lists(_NAME, max_size=4),
       style=st.sampled_from(["posix", "mac", "win", "win-repr", "tilde"]),
       quote=st.sampled_from(["'", '"', ""]))
def test_no_user_name_survives(user: str, parts: list, style: str, quote: str) -> None:
    """A path under a home folder keeps at most its last part, which here never holds the user name."""
    tail = [p for p in parts if user not in p] + ["net.safetensors"]
    path = {"posix": "/home/" + user + "/" + "/".join(tail),
            "mac": "/Users/" + user + "/" + "/".join(tail),
            "win": "C:\\Users\\" + user + "\\" + "\\".join(tail),
            "win-repr": "C:\\\\Users\\\\" + user + "\\\\" + "\\\\".join(tail),
            "tilde": "~" + user + "/" + "/".join(tail)}[style]
    out = public_text(f"cannot read {quote}{path}{quote}: gone", ["/srv/Lora"])
    assert user not in out and "/home" not in out and "Users" not in out, out
    if quote or " " not in path:   # a bare path ends at a space: the words after it stay (relative)
        assert out == f"cannot read {quote}net.safetensors{quote}: gone"


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=60))
def test_any_text(text: str) -> None:
    """Never raises; a text with no path separator and no '~' is left as it is."""
    out = public_text(text, ROOTS)
    assert isinstance(out, str)
    if not any(c in text for c in "/\\~"):
        assert out == text
