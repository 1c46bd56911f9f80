"""Command-line folders of the extension (run by the WebUI before it parses its arguments).

The built-in Lora extension adds the same two options; when it is present (enabled or not, the WebUI
preloads every extension folder) its options are kept and nothing is added twice.
"""
import os


def _has(parser, option: str) -> bool:
    return option in getattr(parser, "_option_string_actions", {})


def _builtin_adds_them() -> bool:
    """The built-in Lora extension's preload adds the options too (it runs whether enabled or not)."""
    try:
        from modules.paths_internal import extensions_builtin_dir
    except ImportError:
        return False
    return any(os.path.isfile(os.path.join(extensions_builtin_dir, d, "preload.py")) for d in ("Lora", "sd_forge_lora"))


def preload(parser) -> None:
    from modules import paths
    if _builtin_adds_them():
        return
    try:
        from modules.paths_internal import normalized_filepath as path_type
    except ImportError:   # older hosts: plain strings
        path_type = str
    if not _has(parser, "--lora-dir"):
        parser.add_argument("--lora-dir", type=path_type, default=os.path.join(paths.models_path, "Lora"),
                            help="Path to directory with Lora/LyCORIS networks.")
    if not _has(parser, "--lyco-dir-backcompat"):
        parser.add_argument("--lyco-dir-backcompat", "--lyco-dir", dest="lyco_dir_backcompat", type=path_type,
                            default=os.path.join(paths.models_path, "LyCORIS"),
                            help="Path to the old LyCORIS directory (also searched for networks).")
