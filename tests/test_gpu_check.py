"""bench/gpu_check.py runs end to end: the smoke version on the CPU at tiny sizes (the real one needs CUDA)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run_check(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "bench/gpu_check.py", *args], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=300)


def test_gpu_check_smoke_on_cpu(tmp_path):
    out = tmp_path / "check.json"
    proc = run_check("--device", "cpu", "--tiny", "--no-tests", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["peak_gpu_gb"] in (0, None)
    for name in ("nerfacc_kernels", "sds_sd_tiny", "sds_if_tiny", "hash_grid_oracle"):
        assert result[name]["ok"], result[name]
    assert result["sds_if_tiny"]["text_encoder_after_encode"] == "cpu"
    assert result["hash_grid_oracle"]["its_per_s"] > 0 and result["hash_grid_oracle"]["frame_ms"] > 0
    # splats under SDS: the torch rasterizer runs (a tiny SD, 16 px); gsplat's half says why it cannot run here
    torch_part, gsplat_part = result["splats_sd512_torch"], result["splats_sd512_gsplat"]
    assert torch_part["ok"] and torch_part["its_per_s"] > 0 and torch_part["gaussians"] > 0, torch_part
    assert gsplat_part["ok"] and "gsplat" in gsplat_part["skipped"], gsplat_part
    assert "all parts ok" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_gpu_check_without_cuda_says_so(tmp_path):
    proc = run_check("--out", str(tmp_path / "x.json"))
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr


def test_gpu_check_finds_the_cuda_tests():
    proc = run_check("--list-tests")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ids = proc.stdout.split()
    assert "tests/test_cuda.py" in ids and "tests/test_priors_diffusers.py::test_fp16_on_cuda" in ids
