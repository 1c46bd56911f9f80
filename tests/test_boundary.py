"""The engine never imports the WebUI, gradio or diffusers."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = ("modules", "backend", "gradio", "diffusers", "transformers", "lycoris", "peft")


def test_no_forbidden_import_statements():
    bad = []
    for path in (ROOT / "lib_lycoris").rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            bad += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert not bad, bad


def test_import_pulls_in_no_host_module():
    code = ("import sys, lib_lycoris, lib_lycoris.patcher, lib_lycoris.cli, lib_lycoris.tags; "
            f"bad = [m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r}]; print(bad); "
            "sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
