"""Who imports whom: bench/ and tests/ never import each other (what both need is in `engine.testing`), no test
module imports another (the shared fixtures are conftest's, reached as fixtures), engine/ stays UI-free and the
product never imports the lab; and the product's modules stay small."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of each import in `path`, and of each file it loads by path (strings naming
    a .py file under bench/ or tests/, as importlib.util.spec_from_file_location would take)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            out.append((node.lineno, node.module or ""))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "spec_from_file_location":
            out.append((node.lineno, "<loaded by path>"))
    return out


def offenders(files, bad) -> list[str]:
    return [f"{p.relative_to(ROOT)}:{line} {name}" for p in files for line, name in imports(p) if bad(name)]


def test_tests_import_no_bench_no_other_test_module_and_no_conftest():
    tests = sorted((ROOT / "tests").rglob("*.py"))
    found = offenders(tests, lambda n: n.split(".")[0] in ("bench", "tests", "conftest") or n == "<loaded by path>")
    assert not found, found


def test_bench_imports_no_tests():
    found = offenders(sorted((ROOT / "bench").rglob("*.py")), lambda n: n.split(".")[0] in ("tests", "conftest"))
    assert not found, found


def test_engine_imports_no_ui():
    found = offenders(sorted((ROOT / "engine").rglob("*.py")),
                      lambda n: n.split(".")[0] in ("playground", "gradio", "gradio_client", "viser", "app"))
    assert not found, found


def test_the_product_never_imports_the_lab():
    product = [ROOT / "app.py", *sorted((ROOT / "engine").rglob("*.py")), *sorted((ROOT / "playground").rglob("*.py"))]
    found = offenders(product, lambda n: n.split(".")[0] == "lab")
    assert not found, found


def test_rooms_stay_small_enough_to_live_in():
    """No file in engine/ or playground/ over 400 lines, no function over 60 (argparse builders aside): a module
    that outgrows this is split by job, as engine/batch/ and playground/session.py were."""
    too_big = []
    for path in [*sorted((ROOT / "engine").rglob("*.py")), *sorted((ROOT / "playground").rglob("*.py"))]:
        text = path.read_text()
        if text.count("\n") > 400:
            too_big.append(f"{path.relative_to(ROOT)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text, str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.endswith("parser"):
                length = node.end_lineno - node.lineno + 1
                if length > 60:
                    too_big.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {length} lines")
    assert not too_big, too_big
