"""Who imports whom: bench/ and tests/ never import each other (what both need is in `engine.testing`), no test
module imports another (the shared fixtures are conftest's, reached as fixtures), and engine/ stays UI-free."""

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
