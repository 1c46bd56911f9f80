"""The file the WebUI runs (A1111 and Forge run every .py in scripts/): it loads the glue package beside
it, `scripts/lycoris_webui/` (one module per concern, see its docstring), and registers its callbacks.

The package is loaded fresh each time the host runs this file (a UI reload runs it again), under the
name `lycoris_webui`, without putting scripts/ on sys.path.
"""
from __future__ import annotations

import importlib.util
import os
import sys

_PACKAGE = "lycoris_webui"


def _load_package():
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), _PACKAGE)
    for name in [m for m in sys.modules if m == _PACKAGE or m.startswith(_PACKAGE + ".")]:
        del sys.modules[name]
    spec = importlib.util.spec_from_file_location(_PACKAGE, os.path.join(here, "__init__.py"),
                                                  submodule_search_locations=[here])
    package = importlib.util.module_from_spec(spec)
    sys.modules[_PACKAGE] = package
    spec.loader.exec_module(package)
    return package


_glue = _load_package()
globals().update({name: getattr(_glue, name) for name in _glue.__all__})
_glue.register()
