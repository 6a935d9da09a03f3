"""The training step's paths, on CPU so a GPU never meets them first, through the trainer's own `train_step`: the
boolean MIM mask, bf16 autocast (Accelerate's mixed_precision="bf16" on CPU), torch.compile of the plain and ST-AR
steps, and the device-side skip of a non-finite step."""
import dataclasses
from pathlib import Path

import pytest
import torch
from reference import key_mask_bias

from star.gpt.model import GPT, GPTConfig
from star.train.distributed import make_accelerator
from star.train.objectives import key_mask
from star.train.plan import TrainPlan, build_model_config
from star.train.safety import NonFiniteGuard
from star.train.star_settings import StarSettings
from star.train.token_loader import TokenBatch

REPO = Path(__file__).resolve().parents[1]
TINY = {"dim": 32, "n_layer": 2, "n_head": 2, "vocab_size": 50, "num_classes": 6, "block_size": 16}


def tiny_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig.resolve({**TINY, **overrides}))
    torch.nn.init.normal_(model.output.weight, std=0.5)  # the zero-initialised head would make the loss trivial
    return model


def tiny_batch(config: GPTConfig, images: int, views: int, seed: int = 1) -> TokenBatch:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, config.vocab_size, (images, views, config.block_size), generator=generator)
    match = torch.arange(config.block_size).expand(images, views, -1).clone()
    return TokenBatch(tokens, torch.randint(0, config.num_classes, (images,), generator=generator), match,
                      torch.arange(images))


def test_boolean_key_mask_is_the_additive_mask_and_gives_the_same_forward():
    generator = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    visible = key_mask(4, 16, 0.25, generator())
    bias = key_mask_bias(4, 16, 0.25, generator())
    assert visible.dtype == torch.bool and visible.shape == (4, 1, 16, 16)
    assert torch.equal(visible, bias == 0), "same draw, same mask"
    assert not torch.equal(visible[0], visible[1]), "masks are drawn per sequence"
    model = tiny_model().eval()
    tokens, labels = torch.randint(0, 50, (4, 15)), torch.arange(4)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, labels, attn_mask=visible).logits,
                                   model(tokens, labels, attn_mask=bias).logits, atol=1e-5, rtol=0)
        assert not torch.allclose(model(tokens, labels, attn_mask=visible).logits, model(tokens, labels).logits)


@pytest.fixture()
def tiny_trainer(tmp_path, monkeypatch):
    """make(self_guided, precision, compile) -> a real Trainer (build_modules, prepare_trainer) of a tiny
    model, 2 images a step, dropout off; its loader is left to the test (train_step reads the iterator it gets)."""
    import json

    from accelerate.state import AcceleratorState

    import star.train.loop as loop

    monkeypatch.setattr(loop, "make_loader", lambda *args: None)
    (tmp_path / "tiny.json").write_text(json.dumps(TINY))

    def make(self_guided: bool, precision: str = "fp32", compile_: bool = False) -> loop.Trainer:
        config = loop.TrainConfig(shards="unused", out=str(tmp_path / "run"), model=str(tmp_path / "tiny.json"),
                                  steps=2, batch_size=2, lr=1e-3, token_dropout=0.0, dropout=0.0,
                                  self_guided=self_guided, views_per_image=2 if self_guided else 1, projector_hidden=64,
                                  precision=precision, compile=compile_, star_settings=StarSettings(num_positions=3))
        model = build_model_config(config)
        star_settings = dataclasses.replace(config.star_settings, contrastive_layer=1) if self_guided else None
        plan = TrainPlan(config=config, model=model, star_settings=star_settings,
                         views_per_image=config.views_per_image, lr=1e-3, precision=precision, world_size=1,
                         batch_per_process=2, total_steps=2, steps_per_epoch=1, tokenizer_sha256="",
                         tokenizer_checkpoint="", tokenizer_config={}, data_digest="", command="")
        AcceleratorState._reset_state()  # a singleton: earlier tests may have set another precision
        accelerator, _ = make_accelerator(config)
        return loop.prepare_trainer(plan, loop.build_modules(plan), accelerator, None)

    yield make
    AcceleratorState._reset_state()


def step_losses(trainer, batch, steps: int = 2) -> list[float]:
    """The logged total loss of `steps` real train_step calls on one batch."""
    from star.train.loop import LOGGED, train_step

    data = iter([batch] * steps)
    return [train_step(trainer, data, step)[0][LOGGED.index("loss")].item() for step in range(steps)]


@pytest.mark.parametrize("self_guided", [True, False])
def test_bf16_autocast_step_runs_on_cpu(tiny_trainer, self_guided):
    """Accelerate's mixed_precision="bf16" on CPU: the same losses as fp32 to bf16 precision, fp32 weights."""
    fp32_trainer = tiny_trainer(self_guided)
    batch = tiny_batch(fp32_trainer.plan.model, 2, 2 if self_guided else 1)
    fp32 = step_losses(fp32_trainer, batch)
    bf16_trainer = tiny_trainer(self_guided, precision="bf16")
    bf16 = step_losses(bf16_trainer, batch)
    assert bf16 == pytest.approx(fp32, rel=0.05), "bf16 computes the same losses, to bf16 precision"
    assert fp32[1] < fp32[0], "the step trained"
    assert all(p.dtype == torch.float32 for p in bf16_trainer.student.parameters()), "autocast keeps weights float32"


def inductor_available() -> bool:
    try:
        import torch._inductor.config  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means no inductor here
        return False
    from shutil import which

    return which("gcc") is not None or which("cc") is not None or which("g++") is not None


@pytest.mark.skipif(not inductor_available(), reason="torch.compile on CPU needs inductor and a C++ compiler")
@pytest.mark.parametrize("self_guided", [True, False])
def test_compiled_step_matches_eager(tiny_trainer, self_guided):
    eager_trainer = tiny_trainer(self_guided)
    batch = tiny_batch(eager_trainer.plan.model, 2, 2 if self_guided else 1)
    eager = step_losses(eager_trainer, batch)
    compiled = step_losses(tiny_trainer(self_guided, compile_=True), batch)
    assert compiled == pytest.approx(eager, rel=1e-4, abs=1e-5)


def test_a_non_finite_gradient_norm_skips_the_step_on_the_device(tiny_trainer, monkeypatch):
    """train_step with an infinite gradient norm leaves the weights and AdamW's state as they were (no host sync
    decides it), and the guard holds the step; the next finite step is applied."""
    import star.train.loop as loop

    trainer = tiny_trainer(True)
    batch = tiny_batch(trainer.plan.model, 2, 2)
    before = [p.detach().clone() for p in trainer.student.parameters()]
    real_clip = loop.clip_gradients
    monkeypatch.setattr(loop, "clip_gradients", lambda trainer: real_clip(trainer) * float("inf"))
    loop.train_step(trainer, iter([batch]), 0)
    assert all(torch.equal(a, p) for a, p in zip(before, trainer.student.parameters())), "the step was not applied"
    assert all(state["step"].item() == 0 for state in trainer.optimizer.optimizer.state.values())
    assert trainer.guard.first_failure()[0] == 1, "the guard reports step 1"
    monkeypatch.setattr(loop, "clip_gradients", real_clip)
    loop.train_step(trainer, iter([batch]), 1)
    assert not all(torch.equal(a, p) for a, p in zip(before, trainer.student.parameters())), "a finite step is applied"


def test_non_finite_guard_reports_the_first_bad_step_only_when_asked():
    guard = NonFiniteGuard(("loss_ar", "loss"), "cpu")
    guard.record(torch.tensor([1.0, 2.0]), 1)
    assert guard.first_failure() is None
    guard.record(torch.tensor([float("nan"), 2.0]), 2)
    guard.record(torch.tensor([float("inf"), float("inf")]), 3)
    step, bad = guard.first_failure()
    assert step == 2 and list(bad) == ["loss_ar"] and bad["loss_ar"] != bad["loss_ar"]  # NaN
    assert guard.first_failure(lambda flags: flags * 0) is None  # no process is bad after the reduction: carry on
    other = NonFiniteGuard(("loss",), "cpu")
    assert other.first_failure(lambda flags: flags + 1) == (None, {})  # only another process saw one
