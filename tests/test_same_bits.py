"""tools/same_bits.py: two versions of the engine side by side in one process (the comparison it makes)."""

import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_the_comparison_names_a_tensor_one_bit_apart_and_a_different_loss():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        from same_bits import compare
    finally:
        sys.path.remove(str(ROOT / "tools"))
    a = {"field.w": torch.ones(3), "generator": torch.arange(4, dtype=torch.uint8)}
    b = {"field.w": torch.ones(3).nextafter(torch.full((3,), 2.0)), "generator": torch.arange(4, dtype=torch.uint8)}
    report = compare({"run": (a, 1.5), "same": (a, 2.0)}, {"run": (b, 1.5), "same": (dict(a), 2.0)})
    assert not report["run"]["identical"] and report["run"]["differ"] == ["field.w"]
    assert report["same"]["identical"]
    assert not compare({"run": (a, 1.5)}, {"run": (a, 1.25)})["run"]["identical"]


def test_a_commit_against_itself_is_bit_identical_in_one_process():
    """The whole tool on its cheapest case: HEAD twice (old engine imported from git, then the new one)."""
    out = subprocess.run([sys.executable, "tools/same_bits.py", "--before", "HEAD", "--after", "HEAD",
                          "--cases", "oracle_cube_grid"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "oracle_cube_grid: bit-identical (45 tensors" in out.stdout
