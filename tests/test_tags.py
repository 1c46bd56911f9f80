"""Prompt tags: table tests prompt -> requests (good, bad, unicode), weight(), and hypothesis properties."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from lib_lycoris.errors import TagError
from lib_lycoris.schedule import constant, parse_schedule
from lib_lycoris.tags import NetworkRequest, format_request, parse_prompt, parse_tag

# prompt -> (prompt without tags, [canonical tags], number of warnings)
PROMPTS = [
    ("a cat", "a cat", [], 0),
    ("a <lora:x:0.8> cat", "a  cat", ["<lora:x:0.8>"], 0),
    ("<lora:x>", "", ["<lora:x:1>"], 0),
    ("<LoRA:x:0.5>", "", ["<lora:x:0.5>"], 0),
    ("<lyco:x:0.5>", "", ["<lyco:x:0.5>"], 0),
    ("<lora:x:0.5:0.7>", "", ["<lora:x:0.5:0.7>"], 0),
    ("<lora:x:0.5:0.7:8>", "", ["<lora:x:0.5:0.7:dyn=8>"], 0),
    ("<lora:x:te=0.3:unet=0.4:dyn=4>", "", ["<lora:x:0.3:0.4:dyn=4>"], 0),
    ("<lora:x:1:te=0.3>", "", ["<lora:x:0.3>"], 0),
    ("<lora:x::0.4>", "", ["<lora:x:1:0.4>"], 0),
    ("<lora:x: 0.5 : unet = 0.2 >", "", ["<lora:x:0.5:0.2>"], 0),
    ("<lora:x:TE=0.5>", "", ["<lora:x:0.5>"], 0),
    ("<lora:x:1:in=0:mid=0.5:out=1>", "", ["<lora:x:1:in=0:mid=0.5>"], 0),
    ("<lora:x:1:lbw=ALL>", "", ["<lora:x:1:lbw=ALL>"], 0),
    ("<lora:x:1:w=all>", "", ["<lora:x:1:lbw=ALL>"], 0),
    ("<lora:x:1:OUTD>", "", ["<lora:x:1:lbw=OUTD>"], 0),
    ("<lora:x:1:" + ",".join(["1"] * 12) + ">", "", ["<lora:x:1:lbw=" + ",".join(["1"] * 12) + ">"], 0),
    ("<lora:x:1:start=3:stop=9>", "", ["<lora:x:1:start=3:stop=9>"], 0),
    ("<lora:x:1:step=3-9>", "", ["<lora:x:1:start=3:stop=9>"], 0),
    ("<lora:x:0@0,1@1:interp=LINEAR>", "", ["<lora:x:0@0,1@1:interp=linear>"], 0),
    ("<lora:x:1:hr=0.5:hrte=0.2>", "", ["<lora:x:1:hr=0.5:hrte=0.2>"], 0),
    ("<lora:x:0.1@1;0.6~6>", "", ["<lora:x:0.1@1,0.6@6>"], 0),
    # names: spaces, dots, unicode, sub-folders, '=' and '@' in names
    ("<lora:styles/ink v2:0.8>", "", ["<lora:styles/ink v2:0.8>"], 0),
    ("<lora:my.lora.v1.5:1>", "", ["<lora:my.lora.v1.5:1>"], 0),
    ("<lora:猫 スタイル:0.6>", "", ["<lora:猫 スタイル:0.6>"], 0),
    ("<lora:Ünïcödé/ëmoji 🎨:1>", "", ["<lora:Ünïcödé/ëmoji 🎨:1>"], 0),
    ("<lora:a=b@c:1>", "", ["<lora:a=b@c:1>"], 0),
    # other extra networks are left alone
    ("<hypernet:h:1> <lora:x:1>", "<hypernet:h:1> ", ["<lora:x:1>"], 0),
    # unknown named keys are kept and reported once per prompt
    ("<lora:x:1:lbwe=ATTN:x=2>", "", ["<lora:x:1:lbwe=ATTN:x=2>"], 1),
    ("<lora:a:1:foo=1> <lora:b:1:foo=2>", " ", ["<lora:a:1:foo=1>", "<lora:b:1:foo=2>"], 1),
    # bad values: warning, fallback, tag kept
    ("<lora:x:abc>", "", ["<lora:x:1>"], 1),
    ("<lora:x:nan>", "", ["<lora:x:1>"], 1),
    ("<lora:x:1e999>", "", ["<lora:x:1>"], 1),
    ("<lora:x:0.5:unet=zz>", "", ["<lora:x:0.5>"], 1),
    ("<lora:x:1:1,2,3>", "", ["<lora:x:1>"], 1),
    ("<lora:x:1:lbw=NOPE>", "", ["<lora:x:1>"], 1),
    ("<lora:x:1:lbw=1,x," + ",".join(["1"] * 10) + ">", "", ["<lora:x:1>"], 1),
    ("<lora:x:1:dyn=0>", "", ["<lora:x:1>"], 1),
    ("<lora:x:1:dyn=2.5>", "", ["<lora:x:1>"], 1),
    ("<lora:x:1:start=-1>", "", ["<lora:x:1>"], 1),
    ("<lora:x:1:step=4>", "", ["<lora:x:1>"], 1),
    ("<lora:x:1:interp=cubic>", "", ["<lora:x:1>"], 1),
    ("<lora:x:1@-1,2@3>", "", ["<lora:x:1>"], 1),
    ("<lora:x:1:2:3:4:5>", "", ["<lora:x:1:2:dyn=3>"], 1),
    ("<lora:x:te=1:te=0.5>", "", ["<lora:x:0.5>"], 1),
    ("<lora:x:1:=3>", "", ["<lora:x:1>"], 1),
    ("<lora:x:1:start=5:stop=2>", "", ["<lora:x:1:start=5:stop=2>"], 1),
    ("<lora:x:1> <lora:x:0.5>", " ", ["<lora:x:1>", "<lora:x:0.5>"], 1),
    # fatal: tag skipped (removed), the rest still works
    ("<lora::1> <lora:y:1>", " ", ["<lora:y:1>"], 1),
    ("<lora: :1>", "", [], 1),
    ("<lora:>", "", [], 1),
    ("<lora:a\tb:1>", "", [], 1),
    # unbalanced: left in the text, rest still works
    ("<lora:x:1 cat", "<lora:x:1 cat", [], 1),
    ("<lora:x:1 <lora:y:0.5>", "<lora:x:1 ", ["<lora:y:0.5>"], 1),
    ("a > b <lora:y:0.5>>", "a > b >", ["<lora:y:0.5>"], 0),
]


@pytest.mark.parametrize("prompt,text,tags,n_warnings", PROMPTS)
def test_prompt_table(prompt: str, text: str, tags: list[str], n_warnings: int) -> None:
    parsed = parse_prompt(prompt)
    assert parsed.prompt == text
    assert [format_request(r) for r in parsed.requests] == tags
    assert len(parsed.warnings) == n_warnings, parsed.warnings


def test_warning_names_the_tag() -> None:
    parsed = parse_prompt("x <lora:bad one:abc> y")
    assert parsed.warnings == ["<lora:bad one:abc>: strength: weight 'abc' is not a number; strength 1 is used"]


def test_unknown_kept() -> None:
    req = parse_tag("<lora:x:1:lbwe=ATTN:Foo=bar>")
    assert req.unknown == {"lbwe": "ATTN", "Foo": "bar"}


@pytest.mark.parametrize("tag", ["<lora:x:abc>", "<lora:x:1:lbw=NOPE>", "<lora:x:1:2:3:4>", "<lora:x:1:dyn=a>",
                                 "<lora::1>", "<lora:>", "lora:x:1", "<hypernet:x:1>", "<lora:x<:1>", "",
                                 "<lora:x:te=1:te=2>"])
def test_parse_tag_strict_raises(tag: str) -> None:
    with pytest.raises(TagError):
        parse_tag(tag)


def test_parse_tag_lenient_collects() -> None:
    warnings: list[str] = []
    req = parse_tag("<lora:x:abc:foo=1>", warnings)
    assert req.te == constant(1.0) and len(warnings) == 2


def test_fields() -> None:
    req = parse_tag("<lyco:dir/x:0.5@1,1@4:0.3:16:lbw=INS:start=2:stop=9:hr=0.1:foo=bar>")
    assert req.name == "dir/x" and req.kind == "lyco" and req.dyn == 16
    assert req.te == parse_schedule("0.5@1,1@4") and req.unet == constant(0.3)
    assert (req.start, req.stop, req.unknown) == (2, 9, {"foo": "bar"})
    assert req.is_scheduled()
    assert not parse_tag("<lora:x:0.5:in=0.5>").is_scheduled()


def test_weight_combines_component_block_lbw() -> None:
    req = parse_tag("<lora:x:0.5:0.8:in=0.5:mid=0:out=2:lbw=" + ",".join(["0.5"] * 26) + ">")
    assert req.weight("te1", None, 1, 10) == 0.5 * 0.5  # te × lbw BASE
    assert req.weight("te2", "IN04", 1, 10) == 0.25  # block ignored for text encoders
    assert req.weight("unet", "IN04", 1, 10) == 0.8 * 0.5 * 0.5
    assert req.weight("unet", "M00", 1, 10) == 0.0
    assert req.weight("unet", "OUT11", 1, 10) == 0.8 * 2 * 0.5
    assert req.weight("unet", None, 1, 10) == 0.8  # outside blocks: unet weight only


def test_weight_schedule_gating_hires() -> None:
    req = parse_tag("<lora:x:0@1,1@3:start=2:stop=4:hr=0.25>")
    assert [req.weight("unet", "IN01", s, 5) for s in range(1, 6)] == [0, 0, 1, 1, 0]
    assert [req.weight("unet", "IN01", s, 5, hires=True) for s in range(1, 6)] == [0, .25, .25, .25, 0]
    with pytest.raises(ValueError):
        req.weight("vae", None, 1, 5)
    with pytest.raises(ValueError):
        req.weight("unet", None, 1, 0)


def test_te_zero_silences_unet_like_a1111() -> None:
    assert parse_tag("<lora:x:te=0>").weight("unet", "IN04", 1, 1) == 0.0
    assert parse_tag("<lora:x:te=0:unet=1>").weight("unet", "IN04", 1, 1) == 1.0


def test_change_points() -> None:
    assert parse_tag("<lora:x:1>").change_points(20) == [1]
    assert parse_tag("<lora:x:0.1@1,0.6@6>").change_points(10) == [1, 6]
    assert parse_tag("<lora:x:1:start=3:stop=5>").change_points(10) == [1, 3, 6]
    assert parse_tag("<lora:x:1:mid=0@0,1@1:interp=linear>").change_points(4) == [1, 2, 3, 4]
    # while the network is off, changing block multipliers change nothing
    assert parse_tag("<lora:x:1:start=4:in=0@1,1@2>").change_points(5) == [1, 4]
    assert parse_tag("<lora:x:1:hr=0@1,1@2>").change_points(3, hires=True) == [1, 2]


def test_requests_are_frozen() -> None:
    req = parse_tag("<lora:x:1>")
    with pytest.raises(AttributeError):
        req.name = "y"  # type: ignore[misc]


def test_format_rejects_unwritable() -> None:
    with pytest.raises(TagError):
        format_request(NetworkRequest(name="a:b"))
    with pytest.raises(TagError):
        format_request(NetworkRequest(name="a", unknown={"k": "v:w"}))


# --- properties ---------------------------------------------------------------------------------------------
_TAG_ALPHABET = st.sampled_from(list("ab xé猫/.:=@,;~<>-+0123456789eE") + ["lora", "lyco", "te", "unet", "in", "lbw",
                                                                       "ALL", "start", "stop", "hr", "dyn", "1.5",
                                                                       "interp", "linear"])
_TAGLIKE = st.builds(lambda kind, parts: f"<{kind}:" + "".join(parts) + ">",
                     st.sampled_from(["lora", "lyco", "LORA", "x"]), st.lists(_TAG_ALPHABET, max_size=20))
_ANY = st.one_of(st.text(max_size=80), _TAGLIKE, st.lists(st.one_of(_TAGLIKE, st.text(max_size=10)), max_size=5)
                 .map("".join))


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(_ANY)
def test_parse_prompt_never_raises(text: str) -> None:
    parsed = parse_prompt(text)
    assert isinstance(parsed.prompt, str)
    for req in parsed.requests:
        assert parse_tag(format_request(req)) == req
        assert parse_prompt(format_request(req)).requests == [req]


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(_ANY)
def test_parse_tag_raises_only_tag_error(text: str) -> None:
    try:
        req = parse_tag(text)
    except TagError:
        return
    again = parse_tag(format_request(req))
    assert again == req
    assert format_request(again) == format_request(req)


_WEIGHT = st.floats(-4, 4, allow_nan=False).map(lambda x: round(x, 3))
_SCHED = st.one_of(_WEIGHT.map(constant),
                   st.lists(st.tuples(_WEIGHT, st.integers(0, 30)), min_size=2, max_size=4)
                   .map(lambda kf: parse_schedule(",".join(f"{w}@{p}" for w, p in kf))))


@given(st.text(alphabet=st.characters(blacklist_characters=":<>", blacklist_categories=("Cc", "Cs")),
               min_size=1, max_size=12).filter(lambda s: s.strip() == s and s),
       st.sampled_from(["lora", "lyco"]), _SCHED, st.one_of(st.none(), _SCHED), st.one_of(st.none(), _SCHED),
       _SCHED, st.one_of(st.none(), st.integers(1, 64)), st.one_of(st.none(), st.integers(0, 40)),
       st.sampled_from(["hold", "linear"]))
def test_format_parse_roundtrip_of_built_requests(name, kind, te, unet, hr, mid, dyn, start,  # type: ignore
                                                  interp) -> None:
    req = NetworkRequest(name=name, kind=kind, te=te, unet=unet, hr=hr, block_mid=mid, dyn=dyn, start=start,
                         interp=interp)
    assert parse_tag(format_request(req)) == req


@given(st.text(max_size=40), st.integers(1, 30))
def test_weights_are_finite(text: str, steps: int) -> None:
    for req in parse_prompt("<lora:x:" + text.replace(">", "") + ">").requests:
        for s in range(1, steps + 1):
            for comp in ("te1", "unet"):
                w = req.weight(comp, "IN04", s, steps)
                assert w == w and abs(w) < float("inf")


def test_requests_hash_and_compare_without_source() -> None:
    a, b = parse_tag("<lora:x:1:foo=1>"), parse_tag(" <lora:x: 1 :foo=1> ")
    assert a == b and hash(a) == hash(b) and a.source != b.source
