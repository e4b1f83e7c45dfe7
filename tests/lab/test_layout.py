"""The product does not depend on the lab: nothing in engine/, playground/ or app.py imports lab/."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_product_never_imports_the_lab():
    offenders = []
    for path in [ROOT / "app.py", *(ROOT / "engine").rglob("*.py"), *(ROOT / "playground").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names if n.split(".")[0] == "lab"]
    assert not offenders, offenders
