"""Testing helpers shipped with the engine (as numpy.testing, torch.testing): what the tests and the benchmarks share.

- `tiny_config`, `tiny_live`: a run that trains in milliseconds a step and keeps going; `wait_for`: poll a
  condition with a timeout.
- Tiny random Stable Diffusion and DeepFloyd IF pipelines built from config and saved like the real checkpoints
  (`write_tiny_sd`, `write_tiny_if`, `write_tiny_taesd`), and a folder laid out as the Hugging Face cache lays
  out a download (`hf_cache`, `partial_cache`). The folders have the real layout (model_index.json, one
  subfolder per component); only the widths are tiny. Two details copy what real users download:
  - the SD tokenizer folder has no `model_max_length` (transformers then reports ~1e30);
  - the IF tokenizer folder holds only `spiece.model` and `tokenizer_config.json`, as DeepFloyd's repository ships
    it, so loading it needs sentencepiece and protobuf.
diffusers, transformers and sentencepiece are imported only by the writers that need them. Like all of engine/,
nothing here imports gradio, viser or playground/.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import string
import time

import torch


# -- small runs: a config that trains in milliseconds a step, and a poll for a condition --------------------
def tiny_config(prior: str = "oracle:sphere", **kw):
    """16x16 renders, 16 samples per ray, a 16^3 grid, one view per step, shading after 2 albedo steps, the
    occupancy grid from step 2. `kw`: Config's own fields. A session built on it should get `tiny_live()`."""
    from engine.config import Config

    return Config(prior=prior, **kw).with_settings({
        "render.resolution": 16, "render.num_samples": 16, "field.grid_resolution": 16, "render.occupancy_warmup": 2,
        "render.occupancy_every": 2, "camera.batch_size": 1, "shading.albedo_only_steps": 2})


def tiny_live(**kw):
    """Live parameters for a session on `tiny_config`: 10,000 steps, so that it keeps running. `kw`: LiveParams'."""
    from engine.config import LiveParams

    return LiveParams(**{"steps": 10_000, **kw})


def wait_for(pred, timeout: float = 30.0, what: str = "condition"):
    """pred()'s first truthy value, polled every 20 ms; AssertionError naming `what` after `timeout` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = pred()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


# -- tiny diffusers pipelines ------------------------------------------------------------------------------
WORDS = ("a", "red", "blue", "cube", "sphere", "front", "side", "back", "overhead", "view", "ugly", "blurry")


def write_tiny_sd(folder: str, prediction_type: str = "epsilon") -> str:
    """A Stable Diffusion 1.x/2.x-shaped pipeline (~0.2M-parameter U-Net) saved to `folder`."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + ",.":  # character-level BPE: every word ends in a "</w>" symbol
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=32)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=32, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8)
    vae = AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, sample_size=16)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                              steps_offset=1, prediction_type=prediction_type)  # what SD checkpoints ship
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None, requires_safety_checker=False
                            ).save_pretrained(folder)
    config_path = os.path.join(folder, "tokenizer", "tokenizer_config.json")
    config = json.load(open(config_path))
    config.pop("model_max_length", None)  # as some SD folders ship: transformers then says ~1e30
    json.dump(config, open(config_path, "w"))
    return folder


def write_spiece_tokenizer(folder: str) -> int:
    """A T5 tokenizer folder like DeepFloyd IF's: a unigram `spiece.model` trained here on WORDS, and its config.
    Returns the vocabulary size."""
    import sentencepiece

    sentences = [" ".join(WORDS[i:] + WORDS[:i]) + ", view" for i in range(len(WORDS))] * 4
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=32, model_type="unigram", hard_vocab_limit=False,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, minloglevel=2)
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    with open(os.path.join(folder, "spiece.model"), "wb") as fh:
        fh.write(model.getvalue())
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as fh:
        json.dump({"tokenizer_class": "T5Tokenizer", "extra_ids": 0, "eos_token": "</s>", "pad_token": "<pad>",
                   "unk_token": "<unk>"}, fh)
    return 32


def write_tiny_if(folder: str) -> str:
    """A DeepFloyd IF stage I-shaped pipeline (pixel U-Net, 3 -> 6 channels, T5 text encoder) saved to `folder`."""
    from diffusers import DDPMScheduler, IFPipeline, UNet2DConditionModel
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    torch.manual_seed(0)
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(w, -1.0) for w in WORDS]
    placeholder = T5Tokenizer(vocab=vocab, extra_ids=0)  # replaced below by the spiece.model folder
    text_encoder = T5EncoderModel(T5Config(vocab_size=40, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                           num_heads=4, relative_attention_num_buckets=8))
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=3, out_channels=6, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        cross_attention_dim=32, encoder_hid_dim=32, attention_head_dim=8, addition_embed_type="text",
        addition_embed_type_num_heads=2, cross_attention_norm="group_norm", resnet_time_scale_shift="scale_shift",
        act_fn="gelu", norm_num_groups=8)
    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2", variance_type="learned_range", thresholding=True,
                              dynamic_thresholding_ratio=0.95, sample_max_value=1.0)
    IFPipeline(tokenizer=placeholder, text_encoder=text_encoder, unet=unet, scheduler=scheduler, safety_checker=None,
               feature_extractor=None, watermarker=None, requires_safety_checker=False).save_pretrained(folder)
    write_spiece_tokenizer(os.path.join(folder, "tokenizer"))
    return folder


def write_tiny_taesd(folder: str) -> str:
    """A tiny `AutoencoderTiny` with the SD VAE's downsampling (x2 here) and 4 latent channels."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1),
                    num_decoder_blocks=(1, 1), latent_channels=4).save_pretrained(folder)
    return folder


# -- the Hugging Face cache's layout -----------------------------------------------------------------------
def repo_files(folder: str) -> list[str]:
    """Every file under `folder`, as sorted paths relative to it."""
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


def hf_cache(src: str, cache: str, repo: str) -> str:
    """`src` laid out as the Hugging Face cache does: blobs/<hash>, snapshots/<commit>/<path> -> link, refs/main.
    Returns the snapshot folder."""
    commit = "0" * 40
    root = os.path.join(cache, "models--" + repo.replace("/", "--"))
    snap = os.path.join(root, "snapshots", commit)
    os.makedirs(os.path.join(root, "blobs"), exist_ok=True)
    os.makedirs(os.path.join(root, "refs"), exist_ok=True)
    with open(os.path.join(root, "refs", "main"), "w") as fh:
        fh.write(commit)
    for i, rel in enumerate(repo_files(src)):
        blob = os.path.join(root, "blobs", f"{i:040x}")
        shutil.copyfile(os.path.join(src, rel), blob)
        os.makedirs(os.path.dirname(os.path.join(snap, rel)), exist_ok=True)
        os.symlink(os.path.relpath(blob, os.path.dirname(os.path.join(snap, rel))), os.path.join(snap, rel))
    return snap


def partial_cache(sd_dir: str, cache: str, repo: str = "org/half-sd") -> str:
    """A cache whose U-Net weights never finished: no snapshot link, a blobs/*.incomplete left behind."""
    snap = hf_cache(sd_dir, cache, repo)
    os.remove(os.path.join(snap, "unet", "diffusion_pytorch_model.safetensors"))
    open(os.path.join(snap, os.pardir, os.pardir, "blobs", "f" * 40 + ".incomplete"), "wb").close()
    return snap
