"""The VQ trainer's GAN term, checkpoints, resume and signals (tiny CPU configurations, seconds each)."""
from __future__ import annotations

import copy
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from star.checkpoint_folder import checkpoint_dirs
from star.signals import StopRequested
from star.vq.checkpoints import VQCheckpoint, read_vq_checkpoint, save_vq_checkpoint_folder
from star.vq.discriminator import (
    PatchDiscriminator,
    adaptive_gan_weight,
    discriminator_logits_side,
    generator_adversarial_loss,
    hinge_discriminator_loss,
)
from star.vq.model import VQConfig
from star.vq.train import VQTrainConfig, build_training, learning_rate_at, train_step, train_vq

REPO = Path(__file__).resolve().parents[1]
TINY_VQ = {"codebook_size": 32, "codebook_embed_dim": 4, "encoder_ch_mult": [1, 2], "decoder_ch_mult": [1, 2],
           "z_channels": 32, "ch": 32, "num_res_blocks": 1}


def _write_images(root: Path, count: int, size: int = 20) -> Path:
    rng = np.random.default_rng(0)
    for index in range(count):
        coarse = rng.integers(0, 256, size=(3, 3, 3), dtype=np.uint8)
        folder = root / f"class_{index % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(coarse).resize((size, size), Image.BILINEAR).save(folder / f"{index:02d}.png")
    return root


@pytest.fixture
def tiny_setup(tmp_path):
    data = _write_images(tmp_path / "images", 8)
    vq_json = tmp_path / "tiny.json"
    vq_json.write_text(json.dumps({"config": TINY_VQ}))
    return data, vq_json


def _config(data, vq_json, out, **overrides) -> VQTrainConfig:
    settings = dict(data_root=str(data), out_dir=str(out), vq_config=str(vq_json), image_size=16, batch_size=4,
                    steps=6, lr=3e-3, dead_code_restart_every=2, holdout_fraction=0.25, seed=0, device="cpu",
                    progress=False, disc_weight=0.5, disc_start=2, disc_channels=8, disc_layers=2, ckpt_every=100)
    return VQTrainConfig(**{**settings, **overrides})


# ---------------------------------------------------------------------------------------------------------------
# The discriminator and its losses
# ---------------------------------------------------------------------------------------------------------------
def test_patch_discriminator_logit_grid_and_the_depth_check():
    torch.manual_seed(0)
    for layers, size, side in ((2, 16, 2), (2, 32, 6), (3, 32, 2), (3, 64, 6)):
        discriminator = PatchDiscriminator(channels=8, layers=layers)
        logits = discriminator(torch.randn(2, 3, size, size))
        assert logits.shape == (2, 1, side, side) and discriminator_logits_side(size, layers) == side
    widths = [m.out_channels for m in PatchDiscriminator(channels=8, layers=4).modules()
              if isinstance(m, torch.nn.Conv2d)]
    assert widths == [8, 16, 32, 64, 64, 1]  # doubling, capped at 8x, then one logit channel
    with pytest.raises(ValueError, match=r"--disc-layers 3 leaves no logits for 16 px crops"):
        VQTrainConfig(data_root="x", image_size=16, disc_layers=3, disc_weight=0.5)
    assert VQTrainConfig(data_root="x", image_size=16, disc_layers=3, disc_weight=0.0).disc_weight == 0.0


def test_hinge_losses_on_a_hand_computed_case():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 0.5])
    # relu(1 - real) = [0, 0.5, 2] (mean 5/6); relu(1 + fake) = [0, 1, 1.5] (mean 5/6); half their sum = 5/6
    assert hinge_discriminator_loss(real, fake).item() == pytest.approx(5 / 6)
    assert hinge_discriminator_loss(torch.tensor([1.0, 3.0]), torch.tensor([-1.0, -4.0])).item() == 0.0
    assert generator_adversarial_loss(fake).item() == pytest.approx(0.5)  # -mean(fake)


def test_adaptive_weight_is_the_clamped_gradient_norm_ratio():
    torch.manual_seed(0)
    inputs, target, direction = torch.randn(5, 3), torch.randn(5, 2), torch.randn(5, 2)
    last_layer = torch.nn.Parameter(torch.randn(3, 2))
    output = inputs @ last_layer  # [5, 2]
    reconstruction_loss = ((output - target) ** 2).mean()
    gan_loss = -(output * direction).mean()
    weight = adaptive_gan_weight(reconstruction_loss, gan_loss, last_layer)

    with torch.no_grad():  # the gradients by hand: d mean((xW - t)^2)/dW = 2 x^T (xW - t) / 10, d gan/dW = -x^T d / 10
        reconstruction_grad = 2 * inputs.t() @ (inputs @ last_layer - target) / 10
        gan_grad = -inputs.t() @ direction / 10
    expected = reconstruction_grad.norm() / (gan_grad.norm() + 1e-4)
    assert weight.item() == pytest.approx(expected.item(), rel=1e-5)
    assert not weight.requires_grad
    assert reconstruction_loss.grad_fn is not None  # the graph is kept for the backward pass that follows

    flat_gan = (output * 0.0).sum()  # a vanishing GAN gradient: the ratio is clamped, not infinite
    assert adaptive_gan_weight(reconstruction_loss, flat_gan, last_layer).item() == 1e4


# ---------------------------------------------------------------------------------------------------------------
# The GAN term in a training step
# ---------------------------------------------------------------------------------------------------------------
def _state_copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


def test_gan_term_is_off_until_disc_start_and_on_after(tiny_setup, tmp_path):
    data, vq_json = tiny_setup
    config = _config(data, vq_json, tmp_path / "unused", disc_start=2, grad_clip=0.0)
    run = build_training(config, VQConfig.resolve(vq_json), torch.device("cpu"))
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    for step in (1, 2):  # steps 1..disc_start: the discriminator neither trains nor shapes the generator's loss
        before = _state_copy(run.discriminator)
        result = train_step(run, images, config, None)
        assert run.step == step and set(result["terms"]) == {"rec", "vq", "commit"}
        assert all(torch.equal(before[key], value) for key, value in run.discriminator.state_dict().items())

    # step 3: on. The same step without the discriminator moves the tokenizer differently
    twin = build_training(config, VQConfig.resolve(vq_json), torch.device("cpu"))
    twin.model.load_state_dict(run.model.state_dict())
    twin.optimizer.load_state_dict(copy.deepcopy(run.optimizer.state_dict()))  # not the same moment tensors
    twin.discriminator, twin.step = None, run.step
    before = _state_copy(run.discriminator)
    result = train_step(run, images, config, None)
    train_step(twin, images, config, None)
    assert {"gan_g", "gan_d", "gan_weight"} <= set(result["terms"]) and result["terms"]["gan_weight"] > 0
    changed = [key for key, value in run.discriminator.state_dict().items() if not torch.equal(before[key], value)]
    assert "main.0.weight" in changed  # the discriminator took its step
    assert not torch.equal(run.model.decoder.conv_out.weight, twin.model.decoder.conv_out.weight)
    assert torch.equal(run.model.quantize.embedding.weight, twin.model.quantize.embedding.weight)  # behind the decoder


def test_lpips_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="VGG16 weights.*offline.*--perceptual none"):
        VQTrainConfig(data_root="x", perceptual="lpips")


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints and resume
# ---------------------------------------------------------------------------------------------------------------
class StopAfter:
    """Stands in for star.signals.SignalStop: SIGTERM 'arrives' during step `step`."""

    def __init__(self, step: int):
        self.calls, self.step, self.received = 0, step, None

    def requested(self, accelerator, every_process: bool) -> bool:
        self.calls += 1
        if self.calls >= self.step:
            self.received = ("SIGTERM", 143)
        return self.received is not None


def test_resume_after_an_interruption_matches_an_uninterrupted_run(tiny_setup, tmp_path):
    data, vq_json = tiny_setup
    straight = train_vq(_config(data, vq_json, tmp_path / "straight"))

    out = tmp_path / "stopped"
    with pytest.raises(StopRequested) as stopped:
        train_vq(_config(data, vq_json, out), stop=StopAfter(3))
    checkpoint = out / "checkpoints" / "step-0000003"
    assert stopped.value.exit_code == 143
    assert str(stopped.value) == (f"stopped at step 3 by SIGTERM: checkpoint written to {checkpoint}; continue with "
                                  "the same command plus --resume auto")
    assert read_vq_checkpoint(checkpoint).discriminator is not None and not (out / "vq.pt").exists()

    with pytest.raises(ValueError, match="holds an unfinished VQ run.*--resume auto"):
        train_vq(_config(data, vq_json, out))
    with pytest.raises(ValueError, match=r"cannot be continued exactly(?s:.*)batch_size: checkpoint 4, now 2"):
        train_vq(_config(data, vq_json, out, resume="auto", batch_size=2))

    resumed = train_vq(_config(data, vq_json, out, resume="auto"))
    assert resumed["resumed_from"] == str(checkpoint)
    final, final_straight = (read_vq_checkpoint(o / "checkpoints" / "step-0000006") for o in (out, tmp_path / "straight"))
    for part in ("vq", "discriminator"):
        mine, reference = getattr(final, part), getattr(final_straight, part)
        assert mine.keys() == reference.keys() and all(torch.equal(mine[k], reference[k]) for k in mine), part
    assert resumed["holdout_psnr"] == straight["holdout_psnr"]
    assert resumed["codes_restarted"] == straight["codes_restarted"] > 0
    assert resumed["train_gan_weight_last50"] == straight["train_gan_weight_last50"]
    assert torch.equal(torch.load(out / "vq.pt", weights_only=True)["model"]["decoder.conv_out.weight"],
                       load_file(str(tmp_path / "straight/checkpoints/step-0000006/vq.safetensors"))[
                           "decoder.conv_out.weight"])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000003", "step-0000006"]  # keep 2

    with pytest.raises(ValueError, match="already finished its 6 steps"):
        train_vq(_config(data, vq_json, out, resume="auto"))


@pytest.mark.parametrize("signal_number, name, exit_code", [(signal.SIGTERM, "SIGTERM", 143),
                                                            (signal.SIGINT, "SIGINT", 130)])
def test_a_signal_stops_the_command_with_one_line_and_a_checkpoint(tiny_setup, tmp_path, signal_number, name,
                                                                   exit_code):
    data, vq_json = tiny_setup
    out = tmp_path / "run"
    command = [sys.executable, str(REPO / "tokenize/train_vq.py"), "--data", str(data), "--out", str(out), "--config",
               str(vq_json), "--image-size", "16", "--batch-size", "2", "--steps", "100000", "--device", "cpu",
               "--no-progress", "--disc-weight", "0.5", "--disc-channels", "8", "--disc-layers", "2", "--ckpt-every", "100000"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment)
    try:
        started = process.stdout.readline()  # printed once the signal handlers are in place
        assert started.startswith("training VQ: steps 1..100000"), started + process.stderr.read()
        process.send_signal(signal_number)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == exit_code, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr and len(lines) == 1, stderr
    step = int(lines[0].split("stopped at step ")[1].split(" ")[0])
    checkpoint = out / "checkpoints" / f"step-{step:07d}"
    assert lines[0] == (f"stopped at step {step} by {name}: checkpoint written to {checkpoint}; continue with the "
                        "same command plus --resume auto")
    assert read_vq_checkpoint(checkpoint).step == step and read_vq_checkpoint(checkpoint).discriminator is not None
    assert not (out / ".lock").exists()


def test_resume_never_replaces_a_vq_it_cannot_continue(tiny_setup, tmp_path):
    data, vq_json = tiny_setup
    out = tmp_path / "old"
    out.mkdir()
    (out / "vq.pt").write_bytes(b"a tokenizer trained without checkpoints")
    with pytest.raises(ValueError, match="holds a vq.pt but no checkpoint to continue from"):
        train_vq(_config(data, vq_json, out, resume="auto"))
    assert (out / "vq.pt").read_bytes() == b"a tokenizer trained without checkpoints"


def test_resume_may_turn_the_gan_on_and_change_the_lr_but_not_the_discriminator(tiny_setup, tmp_path):
    data, vq_json = tiny_setup
    out = tmp_path / "run"
    plain = train_vq(_config(data, vq_json, out, steps=2, disc_weight=0.0))
    assert plain["gan"] is None and plain["train_gan_weight_last50"] is None
    with_gan = train_vq(_config(data, vq_json, out, steps=3, disc_start=2, resume="auto", lr=1e-4))
    assert with_gan["resumed_from"].endswith("step-0000002") and with_gan["train_gan_weight_last50"] > 0
    resumed = read_vq_checkpoint(out / "checkpoints" / "step-0000003")
    assert resumed.discriminator is not None
    assert [g["lr"] for g in resumed.trainer["optimizer"]["param_groups"]] == [1e-4]  # the resumed run's --lr
    with pytest.raises(ValueError, match=r"discriminator: checkpoint \[8, 2\], now \[16, 2\]"):
        train_vq(_config(data, vq_json, out, steps=4, disc_channels=16, resume="auto"))


def test_the_study_vq_stage_resumes_and_its_flags_parse(tmp_path):
    from star.cli import parse_config
    from star.study import commands

    argv = commands.vq_train_argv(tmp_path / "images", tmp_path / "vq", tmp_path / "vq.json", 600, 32)
    assert argv[1].endswith("tokenize/train_vq.py")
    config = parse_config(VQTrainConfig, argv[2:])  # every flag the study passes is one of the trainer's
    assert (config.resume, config.steps, config.batch_size, config.image_size) == ("auto", 600, 32, 32)


def test_learning_rate_schedule_warms_up_then_follows_the_cosine(tiny_setup, tmp_path):
    data, vq_json = tiny_setup
    cosine = _config(data, vq_json, tmp_path / "a", steps=12, lr=1e-3, lr_schedule="cosine", lr_warmup_steps=2,
                     min_lr_fraction=0.1)
    rates = [learning_rate_at(step, cosine) for step in range(1, 13)]
    assert rates[:2] == pytest.approx([5e-4, 1e-3])  # warmup: step / 2 of --lr
    assert rates[-1] == pytest.approx(1e-4)  # the floor at --steps
    assert learning_rate_at(7, cosine) == pytest.approx(1e-4 + 9e-4 * 0.5)  # half way through the 10 cosine steps
    assert all(a > b for a, b in zip(rates[1:], rates[2:]))  # strictly falling after the warmup
    constant = _config(data, vq_json, tmp_path / "b", lr=1e-3)
    assert {learning_rate_at(step, constant) for step in (1, 3, 6)} == {1e-3}
    with pytest.raises(ValueError, match="--min-lr-fraction must be in"):
        _config(data, vq_json, tmp_path / "c", min_lr_fraction=1.5)


def test_a_cosine_run_resumed_mid_schedule_matches_an_uninterrupted_one(tiny_setup, tmp_path):
    data, vq_json = tiny_setup
    flags = dict(lr_schedule="cosine", lr_warmup_steps=2, min_lr_fraction=0.1)
    train_vq(_config(data, vq_json, tmp_path / "straight", **flags))
    out = tmp_path / "stopped"
    with pytest.raises(StopRequested):
        train_vq(_config(data, vq_json, out, **flags), stop=StopAfter(3))
    train_vq(_config(data, vq_json, out, resume="auto", **flags))
    final, reference = (read_vq_checkpoint(o / "checkpoints" / "step-0000006") for o in (out, tmp_path / "straight"))
    assert all(torch.equal(final.vq[k], reference.vq[k]) for k in reference.vq)
    last_rate = learning_rate_at(6, _config(data, vq_json, out, **flags))
    assert [g["lr"] for g in final.trainer["optimizer"]["param_groups"]] == [last_rate]
    assert last_rate == pytest.approx(3e-4)
    assert learning_rate_at(4, _config(data, vq_json, out, **flags)) == pytest.approx(
        3e-4 + 2.7e-3 * 0.5 * (1 + math.cos(math.pi / 2)))  # the first resumed step, half way down


def tiny_vq_checkpoint(step: int, discriminator: bool = True) -> VQCheckpoint:
    return VQCheckpoint(step=step, settings={"batch_size": 4}, vq={"w": torch.full((2,), float(step))},
                        discriminator={"d": torch.ones(1)} if discriminator else None, trainer={"losses": [1.0]})


def test_a_persons_file_in_a_vq_checkpoint_survives_writing_its_step_again_and_pruning(tmp_path):
    folder = save_vq_checkpoint_folder(tmp_path, tiny_vq_checkpoint(3), keep=0)
    (folder / "notes.txt").write_text("a person's notes")
    again = save_vq_checkpoint_folder(tmp_path, tiny_vq_checkpoint(3, discriminator=False), keep=0)
    assert again == folder and (folder / "notes.txt").read_text() == "a person's notes"
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "notes.txt", "optimizer.pt", "vq.safetensors"]
    assert read_vq_checkpoint(folder).discriminator is None  # the earlier discriminator went with its checkpoint
    with pytest.warns(UserWarning, match=r"kept 1 file\(s\) the trainer did not write \(notes.txt\)"):
        save_vq_checkpoint_folder(tmp_path, tiny_vq_checkpoint(6), keep=1)
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-0000006"]
    assert read_vq_checkpoint(checkpoint_dirs(tmp_path)[0]).vq["w"].tolist() == [6.0, 6.0]


def test_resume_skips_a_damaged_vq_checkpoint_and_refuses_when_all_are(tmp_path):
    from star.vq.checkpoints import read_newest_vq_checkpoint

    older = save_vq_checkpoint_folder(tmp_path, tiny_vq_checkpoint(3), keep=0)
    newer = save_vq_checkpoint_folder(tmp_path, tiny_vq_checkpoint(6), keep=0)
    (newer / "vq.safetensors").write_bytes(b"truncated")
    with pytest.warns(UserWarning, match="skipping damaged checkpoint .*step-0000006"):
        assert read_newest_vq_checkpoint(tmp_path).step == 3
    (older / "discriminator.safetensors").write_bytes((newer / "optimizer.pt").read_bytes()[:10])
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="every checkpoint in .* is damaged"):
        read_newest_vq_checkpoint(tmp_path)
    assert read_newest_vq_checkpoint(tmp_path / "empty") is None
