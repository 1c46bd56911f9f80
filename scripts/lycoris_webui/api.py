"""API routes, the infotext paste-back, and what the Networks tab and API say about one network file."""
from __future__ import annotations

import logging
from typing import Optional

from modules import extra_networks

from lib_lycoris.errors import LycorisError
from lib_lycoris.files import read_metadata

from .handler import EXTRA_NETWORK, ExtraNetworkLycoris, take_over
from .host import _TAG_NAME, HOST, INFOTEXT_HASHES, tag_name

log = logging.getLogger("lycoris")


def on_infotext_pasted(infotext: str, params: dict) -> None:
    """`Lora hashes` -> the local names of the networks with those hashes (A1111 behaviour)."""
    hashes = params.get(INFOTEXT_HASHES)
    prompt = params.get("Prompt")
    if not hashes or not isinstance(prompt, str):
        return
    wanted = {}
    for part in str(hashes).split(","):
        name, _, h = part.partition(":")
        if h.strip():
            wanted[name.strip()] = h.strip()
    if not wanted:
        return
    by_hash = {}

    def local_name(h: str) -> Optional[str]:
        if not by_hash:
            for e in HOST.runtime.index.entries():
                eh = HOST.short_hash(e.path)
                if eh:
                    by_hash.setdefault(eh, e)
        e = by_hash.get(h)
        return None if e is None else tag_name(e)

    def replace(m):
        kind, name = m.group(1), m.group(2)
        h = wanted.get(name.strip())
        if h is None:
            return m.group(0)
        try:
            if HOST.short_hash(HOST.runtime.index.resolve(name)) == h:
                return m.group(0)
        except LycorisError:
            pass   # not found under this name: look it up by hash below
        local = local_name(h)
        return m.group(0) if local is None else f"<{kind}:{local}"

    params["Prompt"] = _TAG_NAME.sub(replace, prompt)


def base_model_of(path, metadata: dict) -> str:
    """'sd1'|'sd2'|'sdxl'|'sd3'|'flux'|'unknown' for a card: metadata, else key names and shapes of the header."""
    from lib_lycoris.network import base_model_from_metadata, base_model_of_file
    found = base_model_from_metadata(metadata)
    if found:
        return found[0]
    try:
        return base_model_of_file(path)[0]
    except LycorisError as e:
        log.warning("%s", e)
        return "unknown"


def network_json(entry) -> dict:
    try:
        md = read_metadata(entry.path)
    except LycorisError as e:
        log.warning("%s", e)
        md = {}
    return {"name": entry.relname, "alias": entry.alias or entry.stem, "path": str(entry.path), "metadata": md}


def inspect_network(name: str) -> dict:
    from lib_lycoris.inspect import describe
    entry = HOST.runtime.index.resolve_entry(name)
    net = HOST.runtime.cache.get(entry.path, entry.stem)
    info = describe(net, extra_networks.get_user_metadata(str(entry.path)))
    info["hash"] = HOST.short_hash(entry.path)
    return info


def _replace_routes(app, paths: set) -> None:
    """Drop routes other handlers (the built-in Lora extension) registered for these paths."""
    app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) not in paths]


def on_app_started(_demo, app) -> None:
    from fastapi import HTTPException
    take_over()
    _replace_routes(app, {"/sdapi/v1/loras", "/sdapi/v1/refresh-loras"})

    @app.get("/sdapi/v1/loras")
    def get_loras():
        return [network_json(e) for e in HOST.runtime.index.entries()]

    @app.post("/sdapi/v1/refresh-loras")
    def refresh_loras():
        HOST.refresh()

    @app.get("/sdapi/v1/lycoris/inspect")
    def inspect(name: str):
        try:
            return inspect_network(name)
        except LycorisError as e:
            raise HTTPException(status_code=404, detail=HOST.runtime.public_text(str(e))) from e

    @app.post("/sdapi/v1/lycoris/export")
    def export(body: dict):
        """{"prompt": "<lora:a:0.8> …", "mode": "rank"|"fro"|"size-mb"|"exact", "value": N, "name": "file"}."""
        from .export_tab import export_current
        try:
            report = export_current(str(body.get("prompt", "")), str(body.get("mode", "rank")), body.get("value"),
                                    str(body.get("name", "")))
        except LycorisError as e:
            raise HTTPException(status_code=400, detail=HOST.runtime.public_text(str(e))) from e
        out = report.to_dict()
        out["output"] = HOST.runtime.public_text(str(report.output))
        return out

    @app.get("/sdapi/v1/lycoris/status")
    def status():
        reg = extra_networks.extra_network_registry.get("lora")
        alias = extra_networks.extra_network_aliases.get("lyco")
        act = HOST.activation
        return {"lora_handler": type(reg).__module__ + "." + type(reg).__name__ if reg else None,
                "lyco_alias_is_ours": isinstance(alias, ExtraNetworkLycoris),
                "roots": [str(r) for r in HOST.runtime.roots],
                "networks": len(HOST.runtime.index.entries()),
                "cache": {"networks": len(HOST.runtime.cache), "bytes": HOST.runtime.cache.nbytes,
                          "hits": HOST.runtime.cache.hits, "misses": HOST.runtime.cache.misses},
                "active": [r.name for r, _ in act.used] if act else [],
                "handed_back": EXTRA_NETWORK.handed_back,
                "builtin": type(EXTRA_NETWORK.builtin).__name__ if EXTRA_NETWORK.builtin else None}
