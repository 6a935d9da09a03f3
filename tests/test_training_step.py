"""The training step's paths, on CPU so a GPU never meets them first: the boolean MIM mask, bf16 autocast
(Accelerate's mixed_precision="bf16" on CPU), torch.compile of the plain and ST-AR steps, and the device-side
non-finite guard."""
from pathlib import Path

import pytest
import torch
from reference import key_mask_bias

from star.gpt.model import GPT, GPTConfig
from star.train.objectives import Projector, StudentWithProjector, key_mask, make_teacher, micro_batch_losses
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


def run_steps(config, student, projector, star: bool, batch, steps: int = 2) -> list[float]:
    """Loss values of `steps` optimiser steps on one batch (fixed seeds)."""
    settings = StarSettings(contrastive_layer=1, num_positions=3)
    wrapped = StudentWithProjector(student, projector).train()
    teacher = make_teacher(getattr(student, "_orig_mod", student))
    optimizer = torch.optim.AdamW(wrapped.parameters(), lr=1e-3, fused=True)
    losses = []
    for step in range(steps):
        torch.manual_seed(step)
        terms = micro_batch_losses(batch, wrapped, teacher, settings if star else None, config,
                                torch.Generator().manual_seed(step))
        terms["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(terms["loss"].item())
    return losses


def seeded_projector(dim: int, star: bool):
    torch.manual_seed(9)
    return Projector(dim, 64) if star else None


@pytest.mark.parametrize("star", [True, False])
def test_bf16_autocast_step_runs_on_cpu(star):
    no_dropout = dict(token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0)
    model = tiny_model(**no_dropout)
    config = model.config
    batch = tiny_batch(config, 2, 2 if star else 1)
    fp32 = run_steps(config, tiny_model(**no_dropout), seeded_projector(config.dim, star), star, batch, steps=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what Accelerate's mixed_precision="bf16" does on CPU
        bf16 = run_steps(config, model, seeded_projector(config.dim, star), star, batch, steps=2)
    assert all(torch.isfinite(torch.tensor(bf16)))
    assert bf16[0] == pytest.approx(fp32[0], rel=0.05), "bf16 computes the same loss, to bf16 precision"
    assert all(p.dtype == torch.float32 for p in model.parameters()), "autocast keeps the weights float32"


def inductor_available() -> bool:
    try:
        import torch._inductor.config  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means no inductor here
        return False
    from shutil import which

    return which("gcc") is not None or which("cc") is not None or which("g++") is not None


@pytest.mark.skipif(not inductor_available(), reason="torch.compile on CPU needs inductor and a C++ compiler")
@pytest.mark.parametrize("star", [True, False])
def test_compiled_step_matches_eager(star):
    settings = dict(token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0)
    eager_model, compiled_model = tiny_model(**settings), tiny_model(**settings)
    config = eager_model.config
    batch = tiny_batch(config, 2, 2 if star else 1)
    eager = run_steps(config, eager_model, seeded_projector(config.dim, star), star, batch)
    compiled = run_steps(config, torch.compile(compiled_model), seeded_projector(config.dim, star), star, batch)
    assert compiled == pytest.approx(eager, rel=1e-4, abs=1e-5)


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
