"""`python -m engine doctor`: offline, light (no diffusers / transformers imported), and right about what the
Hugging Face cache holds. Its wall time is measured by bench/bench_latency.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.testing import hf_cache, partial_cache, write_tiny_if, write_tiny_sd

ROOT = Path(__file__).resolve().parents[1]


def doctor(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine", "doctor", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)  # a hang, not a speed: ~2 s here


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """An HF cache with a complete tiny SD, a complete tiny IF and a half-downloaded SD."""
    root = tmp_path_factory.mktemp("hf")
    src = tmp_path_factory.mktemp("src")
    sd = write_tiny_sd(str(src / "sd"))
    hf_cache(sd, str(root), "org/tiny-sd")
    hf_cache(write_tiny_if(str(src / "if")), str(root), "org/tiny-if")
    partial_cache(sd, str(root))  # org/half-sd
    return str(root)


def test_doctor_json_lists_what_runs_offline(cache):
    out = doctor("--json", env={"HF_HUB_CACHE": cache, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    facts = json.loads(out.stdout)
    assert facts["device"] in ("cpu", "cuda") and facts["total_gb"] > 0 and facts["free_gb"] > 0
    assert set(facts["versions"]) >= {"torch", "nerfacc", "diffusers", "transformers"} and facts["versions"]["torch"]
    assert set(facts["nerfacc_kernels"]) == {"cuda", "built", "prebuilt", "nvcc", "lock", "detail"}
    priors = facts["priors"]
    assert priors["embedded"]["offline"] is True
    assert priors["sd"]["cached"] == ["org/tiny-sd"] and priors["if"]["cached"] == ["org/tiny-if"]
    assert [c["id"] for c in facts["incomplete_in_cache"]] == ["org/half-sd"]
    assert facts["fp16"] == (facts["device"] == "cuda")
    for kind in ("sd", "if"):
        p = priors[kind]
        assert p["needs_gb_cpu_offload"] < p["needs_gb"] and p["fits"] == (p["needs_gb"] <= p["free_gb"])


def test_doctor_text_and_no_heavy_imports(cache):
    out = doctor(env={"HF_HUB_CACHE": cache})
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert text.startswith("device: ") and "nerfacc kernels: " in text and "embedded: ready" in text
    assert "sd: in the cache: org/tiny-sd" in text and "org/half-sd is only partly downloaded" in text
    probe = ("import sys, engine.doctor as d; d.diagnose(); "
             "print([m for m in ('diffusers', 'transformers', 'nerfacc.cuda._backend') if m in sys.modules])")
    loaded = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "HF_HUB_CACHE": cache})
    assert loaded.stdout.strip() == "[]", loaded.stderr
