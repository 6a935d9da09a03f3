"""VQ tokenizer: parity with the original LlamaGen code, strict checkpoint loading, configs, the small trainer."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from star.vq.model import VQ_PRESETS, VQConfig, VQModel, load_vq, save_vq_checkpoint
from star.vq.train import (
    VQTrainConfig,
    center_crop_array,
    evaluate_reconstruction,
    list_images,
    split_holdout,
    train_vq,
)


@pytest.fixture(scope="module")
def fixtures(fixtures_dir):
    from safetensors.torch import load_file

    return {
        "ckpt": fixtures_dir / "vq_small.pt",
        "config": fixtures_dir / "vq_small.json",
        "io": load_file(str(fixtures_dir / "vq_small_io.safetensors")),
        "state_dict": torch.load(fixtures_dir / "vq_small.pt", weights_only=True)["model"],
    }


# ---------------------------------------------------------------------------------------------------------------
# Parity with LlamaGen's own code
# ---------------------------------------------------------------------------------------------------------------
def test_fixture_parity_tokens_decode_and_reconstruction(fixtures):
    model = load_vq(fixtures["ckpt"], fixtures["config"])
    io = fixtures["io"]
    assert not model.training
    with torch.no_grad():
        indices = model.encode_indices(io["images"])
        decoded = model.decode_indices(io["indices"])
        reconstruction, _ = model(io["images"])
    assert indices.dtype == torch.int64 and indices.shape == (2, 8, 8)
    assert torch.equal(indices, io["indices"])
    assert (decoded - io["decoded_from_indices"]).abs().max() < 1e-4
    assert (reconstruction - io["reconstruction"]).abs().max() < 1e-4


def test_vq16_state_dict_layout_matches_llamagen():
    with torch.device("meta"):  # shapes only: no 288 MB allocation
        model = VQModel(VQConfig.resolve("VQ-16"))
    state = model.state_dict()
    params = dict(model.named_parameters())
    assert len(params) == 343 and len(state) == 344
    assert abs(sum(p.numel() for p in params.values()) / 1e6 - 71.88) < 0.01
    expected_shapes = {
        "quantize.codebook_used": (65536,),
        "quantize.embedding.weight": (16384, 8),
        "encoder.conv_blocks.4.res.0.nin_shortcut.weight": (512, 256, 1, 1),
        "encoder.conv_blocks.3.downsample.conv.weight": (256, 256, 3, 3),
        "encoder.conv_out.weight": (256, 512, 3, 3),
        "decoder.conv_blocks.1.res.0.nin_shortcut.weight": (256, 512, 1, 1),
        "decoder.conv_blocks.0.attn.2.proj_out.weight": (512, 512, 1, 1),
        "decoder.conv_blocks.3.upsample.conv.weight": (128, 128, 3, 3),
        "decoder.conv_out.weight": (3, 128, 3, 3),
        "quant_conv.weight": (8, 256, 1, 1),
        "post_quant_conv.weight": (256, 8, 1, 1),
    }
    for key, shape in expected_shapes.items():
        assert tuple(state[key].shape) == shape, key
    assert "decoder.conv_blocks.4.upsample.conv.weight" not in state  # no upsample after the last level
    assert not any(key.startswith("encoder.conv_blocks.3.attn") for key in state)  # attention only at level 4


# ---------------------------------------------------------------------------------------------------------------
# Strict loading and its errors
# ---------------------------------------------------------------------------------------------------------------
def test_truncated_checkpoint_names_missing_unexpected_and_shapes(fixtures, tmp_path):
    state = dict(fixtures["state_dict"])
    for key in ("decoder.conv_out.weight", "decoder.conv_out.bias", "encoder.mid.1.q.weight"):
        del state[key]
    state["decoder.extra_head.weight"] = torch.zeros(3)
    state["quant_conv.bias"] = torch.zeros(4)  # model wants (8,)
    broken = tmp_path / "broken_vq.pt"
    torch.save({"model": state}, broken)
    with pytest.raises(ValueError) as caught:
        load_vq(broken, fixtures["config"])
    message = str(caught.value)
    assert str(broken) in message
    assert "missing keys: 3" in message and "decoder.conv_out.weight" in message
    assert "unexpected keys: 1" in message and "decoder.extra_head.weight" in message
    assert "shape mismatches: 1" in message and "quant_conv.bias: checkpoint (4,) vs model (8,)" in message
    assert "--vq-config" in message and "'codebook_size': 256" in message


def test_wrong_config_is_rejected_with_a_hint(fixtures):
    with pytest.raises(ValueError, match=r"(?s)does not match the VQ config.*missing keys.*--vq-config"):
        load_vq(fixtures["ckpt"], "VQ-8")


def test_other_containers_load_and_missing_usage_buffer_is_tolerated(fixtures, tmp_path):
    io = fixtures["io"]
    state = {key: value for key, value in fixtures["state_dict"].items() if key != "quantize.codebook_used"}
    for name, container in (("raw", state), ("ema", {"ema": state, "model": {}}), ("sd", {"state_dict": state})):
        path = tmp_path / f"{name}.pt"
        torch.save(container, path)
        model = load_vq(path, fixtures["config"])
        assert torch.equal(model.encode_indices(io["images"]), io["indices"]), name
        assert torch.equal(model.quantize.codebook_used, torch.zeros(65536))


def test_save_then_load_roundtrip_uses_sidecar_config(fixtures, tmp_path):
    model = load_vq(fixtures["ckpt"], fixtures["config"])
    path = tmp_path / "out" / "tok.pt"
    config_path = save_vq_checkpoint(model, path)
    assert config_path == tmp_path / "out" / "tok.json"
    assert set(torch.load(path, weights_only=True)) == {"model"}  # LlamaGen's container
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    reloaded = load_vq(path)  # config found beside the checkpoint
    assert reloaded.config == model.config
    with torch.no_grad():
        assert torch.equal(reloaded.decode_indices(fixtures["io"]["indices"]),
                           model.decode_indices(fixtures["io"]["indices"]))


# ---------------------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------------------
def test_presets_resolve_to_llamagen_settings():
    vq16, vq8 = VQConfig.resolve("VQ-16"), VQConfig.resolve("VQ-8")
    assert vq16.encoder_ch_mult == vq16.decoder_ch_mult == (1, 1, 2, 2, 4) and vq16.downsample == 16
    assert vq8.encoder_ch_mult == (1, 2, 2, 4) and vq8.downsample == 8
    assert VQConfig.resolve("VQ-tiny").downsample == 8  # ours, for CPU demos
    assert (vq16.codebook_size, vq16.codebook_embed_dim, vq16.z_channels, vq16.ch) == (16384, 8, 256, 128)
    vq16.codebook_size = 7  # a resolved preset is a copy
    assert VQ_PRESETS["VQ-16"].codebook_size == 16384
    assert VQConfig.resolve(vq8.to_dict()) == vq8
    with pytest.raises(ValueError, match="VQ-16"):
        VQConfig.resolve("VQ-32")


def test_json_config_forms_and_unknown_field(tmp_path, fixtures):
    wrapped = VQConfig.resolve(fixtures["config"])
    assert (wrapped.ch, wrapped.encoder_ch_mult, wrapped.downsample, wrapped.num_res_blocks) == (32, (1, 2, 2), 4, 2)
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps(wrapped.to_dict()))
    assert VQConfig.resolve(plain) == wrapped
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"config": {**wrapped.to_dict(), "codebook_sise": 5}}))
    with pytest.raises(ValueError, match=r"codebook_sise.*bad\.json"):
        VQConfig.resolve(bad)
    with pytest.raises(ValueError, match="multiple of 32"):
        VQConfig(ch=16)


# ---------------------------------------------------------------------------------------------------------------
# Quantizer behaviour
# ---------------------------------------------------------------------------------------------------------------
def test_quantizer_losses_straight_through_and_usage_queue():
    torch.manual_seed(0)
    config = VQConfig(codebook_size=16, codebook_embed_dim=4, encoder_ch_mult=(1,), decoder_ch_mult=(1,),
                      z_channels=32, ch=32, num_res_blocks=1)
    quantizer = VQModel(config).quantize.train()
    latents = torch.randn(2, 4, 3, 3, requires_grad=True)  # [B, C, h, w]
    quantized, losses, indices = quantizer(latents)

    unit = F.normalize(latents.detach().permute(0, 2, 3, 1), dim=-1)  # [B, h, w, C]
    codebook = F.normalize(quantizer.embedding.weight.detach(), dim=-1)
    expected_indices = (unit.reshape(-1, 4) @ codebook.t()).argmax(dim=1).view(2, 3, 3)  # max cosine
    assert torch.equal(indices, expected_indices)
    assert torch.allclose(quantized.permute(0, 2, 3, 1), codebook[expected_indices], atol=1e-6)
    squared_gap = ((codebook[expected_indices] - unit) ** 2).mean()
    assert torch.allclose(losses.vq_loss, squared_gap) and torch.allclose(losses.commit_loss, 0.25 * squared_gap)
    assert losses.entropy_loss.item() == 0.0

    # straight-through: the gradient reaches the latents as if quantization were the identity after L2 norm
    weights = torch.randn_like(quantized)
    (grad_st,) = torch.autograd.grad((quantized * weights).sum(), latents)
    (grad_id,) = torch.autograd.grad((F.normalize(latents, dim=1) * weights).sum(), latents)
    assert torch.allclose(grad_st, grad_id, atol=1e-6)

    # usage queue: training calls append the newest indices; eval calls do not
    assert torch.equal(quantizer.codebook_used[-18:], indices.flatten().float())
    before = quantizer.codebook_used.clone()
    quantizer.eval()(latents)
    assert torch.equal(quantizer.codebook_used, before)


# ---------------------------------------------------------------------------------------------------------------
# Small-VQ trainer
# ---------------------------------------------------------------------------------------------------------------
def _write_smooth_images(root: Path, count: int, size: int = 20) -> None:
    rng = np.random.default_rng(0)
    for index in range(count):
        coarse = rng.integers(0, 256, size=(3, 3, 3), dtype=np.uint8)  # smooth colour fields, learnable quickly
        image = Image.fromarray(coarse).resize((size, size), Image.BILINEAR)
        folder = root / f"class_{index % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{index:02d}.png")


def test_training_reduces_loss_and_checkpoint_reloads_identically(tmp_path):
    data = tmp_path / "images"
    _write_smooth_images(data, 12)
    tiny = tmp_path / "tiny.json"
    tiny.write_text(json.dumps({"config": {
        "codebook_size": 32, "codebook_embed_dim": 4, "encoder_ch_mult": [1, 2], "decoder_ch_mult": [1, 2],
        "z_channels": 32, "ch": 32, "num_res_blocks": 1}}))
    config = VQTrainConfig(data_root=str(data), out_dir=str(tmp_path / "run"), vq_config=str(tiny), image_size=16,
                           batch_size=8, steps=40, lr=3e-3, dead_code_restart_every=10, holdout_fraction=0.25,
                           seed=0, device="cpu", progress=False)
    metrics = train_vq(config)

    assert metrics["holdout_psnr"] > metrics["holdout_psnr_untrained"] + 1.0  # reconstruction loss went down (~2.5 dB here)
    assert 0 < metrics["holdout_codes_used"] <= 32 and metrics["num_holdout_images"] == 3
    run = tmp_path / "run"
    assert json.loads((run / "metrics.json").read_text()) == metrics
    assert json.loads((run / "train_config.json").read_text())["steps"] == 40
    before = (run / "vq.pt").read_bytes()
    with pytest.raises(ValueError, match="already holds a trained VQ"):  # a rerun into the same --out
        train_vq(config)
    assert (run / "vq.pt").read_bytes() == before

    # the written checkpoint is official-format and reproduces the trainer's own held-out numbers exactly
    assert set(torch.load(run / "vq.pt", weights_only=True)) == {"model"}
    reloaded = load_vq(run / "vq.pt", run / "vq.json")
    assert reloaded.config == VQConfig.resolve(tiny)
    _, held_out = split_holdout(list_images(data), 0.25, 500, seed=0)
    pixels = torch.from_numpy(np.stack([center_crop_array(Image.open(p).convert("RGB"), 16) for p in held_out]))
    again = evaluate_reconstruction(reloaded, pixels.permute(0, 3, 1, 2))
    assert again["psnr"] == pytest.approx(metrics["holdout_psnr"], abs=1e-9)
    assert again["codes_used"] == metrics["holdout_codes_used"]


@pytest.mark.parametrize("overrides, message", [
    ({"batch_size": 0}, "--batch-size must be > 0"),
    ({"steps": -5}, "--steps must be > 0"),
    ({"image_size": 0}, "--image-size must be > 0"),
    ({"lr": float("nan")}, "--lr must be a finite number > 0"),
    ({"grad_clip": -1.0}, "--grad-clip must be a finite number >= 0"),
    ({"holdout_fraction": 1.0}, r"--holdout-fraction must be in \[0, 1\)"),
    ({"precision": "fp16"}, "--precision 'fp16': choose one of auto, fp32, bf16"),
    ({"num_workers": -1}, "--num-workers must be >= 0"),
])
def test_trainer_settings_are_validated_in_the_config(overrides, message):
    with pytest.raises(ValueError, match=message):
        VQTrainConfig(data_root="images", **overrides)


def test_trainer_command_line_flags_come_from_the_config(tmp_path):
    from star.cli import parse_config

    config = parse_config(VQTrainConfig, ["--data", "imgs", "--out", str(tmp_path), "--config", "VQ-8", "--steps", "7",
                                          "--precision", "fp32", "--no-progress", "--num-workers", "2"])
    assert (config.data_root, config.out_dir, config.vq_config, config.steps) == ("imgs", str(tmp_path), "VQ-8", 7)
    assert (config.precision, config.progress, config.num_workers) == ("fp32", False, 2)
    with pytest.raises(SystemExit) as caught:
        parse_config(VQTrainConfig, ["--data", "imgs", "--batch-size", "-3"])
    assert caught.value.code == 2


def test_trainer_lists_every_image_extension_of_the_project(tmp_path):
    from star.images import IMAGE_EXTENSIONS

    for index, extension in enumerate(IMAGE_EXTENSIONS):
        (tmp_path / "c").mkdir(exist_ok=True)
        (tmp_path / "c" / f"{index}{extension.upper() if index % 2 else extension}").write_bytes(b"x")
    (tmp_path / "c" / "notes.txt").write_text("no")
    assert len(list_images(tmp_path)) == len(IMAGE_EXTENSIONS)


def test_a_second_trainer_on_the_same_out_is_refused(tmp_path):
    import socket
    import subprocess
    import sys

    from star.lock import FolderLocked

    _write_smooth_images(tmp_path / "images", 4)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / ".lock").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(),
                                                            "purpose": "tokenize/train_vq.py"}))
        with pytest.raises(FolderLocked, match=f"tokenize/train_vq.py .*pid {holder.pid}"):
            train_vq(VQTrainConfig(data_root=str(tmp_path / "images"), out_dir=str(tmp_path / "run"), vq_config="VQ-tiny",
                                   image_size=16, steps=1, device="cpu", progress=False))
    finally:
        holder.kill()
        holder.wait()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock"]
