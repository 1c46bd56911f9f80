"""Run by the WebUI's installer: the engine needs only torch, safetensors and numpy, which every supported
host (A1111 1.7-1.10, Forge) already installs, so nothing is installed here; a missing one is reported."""
import importlib.util
import logging

log = logging.getLogger("lycoris")

for _name in ("torch", "safetensors", "numpy"):
    if importlib.util.find_spec(_name) is None:
        log.warning("lycoris-loader needs %s, which this WebUI does not provide", _name)
