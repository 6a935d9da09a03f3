"""The fast paths of the training step (issue 9), checked on CPU so a GPU never meets them first: the chunked
head + loss, the teacher's head-less forward, the boolean MIM mask, the device-side non-finite guard, bf16
autocast (Accelerate's mixed_precision="bf16" on CPU) and torch.compile of the plain and ST-AR steps."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import star.gpt.model as gpt_model
from star.gpt.model import GPT, GPTConfig, chunked_head_loss, next_token_loss
from star.train.loop import _forward_losses
from star.train.objectives import (
    NonFiniteGuard,
    Projector,
    StarSettings,
    StudentWithProjector,
    key_mask,
    key_mask_bias,
    make_teacher,
)
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


def test_chunked_head_loss_equals_full_cross_entropy_in_value_and_gradients(monkeypatch):
    monkeypatch.setattr(gpt_model, "_HEAD_CHUNK_ELEMENTS", 7 * 50)  # 7 rows per chunk: uneven last chunk
    torch.manual_seed(0)
    hidden = torch.randn(30, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (30,))
    expected = F.cross_entropy((hidden @ weight.t()).float(), targets)
    (expected * 3).backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    loss = chunked_head_loss(hidden, weight, targets)
    (loss * 3).backward()  # the upstream gradient scales the saved gradients
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(hidden.grad, grads[0])
    torch.testing.assert_close(weight.grad, grads[1])
    with torch.no_grad():  # no gradient work at all when none is needed
        torch.testing.assert_close(chunked_head_loss(hidden, weight, targets), expected.detach())


def test_chunked_head_loss_under_bf16_autocast_follows_the_plain_head(monkeypatch):
    monkeypatch.setattr(gpt_model, "_HEAD_CHUNK_ELEMENTS", 7 * 50)
    torch.manual_seed(0)
    hidden = torch.randn(30, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (30,))
    results = []
    for head in (lambda: F.cross_entropy((hidden @ weight.t()).float(), targets),
                 lambda: chunked_head_loss(hidden, weight, targets)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = head()
        loss.backward()
        results.append((loss.detach(), hidden.grad.clone(), weight.grad.clone()))
        hidden.grad = weight.grad = None
    for plain, chunked in zip(*results):  # both round the matmuls to bf16; the rest is float32
        torch.testing.assert_close(chunked, plain, rtol=0.02, atol=0.02 * plain.abs().max().item())


def test_forward_with_targets_matches_logits_loss_and_head_can_be_skipped():
    model = tiny_model()
    tokens, labels = torch.randint(0, 50, (3, 16)), torch.tensor([0, 2, 5])
    model.eval()
    reference = model(tokens[:, :-1], labels, return_final_hidden=True)
    ref_loss = next_token_loss(reference.logits, tokens)
    ref_loss.backward()
    ref_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    fused = model(tokens[:, :-1], labels, targets=tokens)
    assert fused.logits is None, "the [B, S, V] logits must not be materialised"
    torch.testing.assert_close(fused.loss, ref_loss)
    fused.loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name], msg=name)
    headless = model(tokens[:, :-1], labels, return_layers=(1,), return_final_hidden=True, head=False)
    assert headless.logits is None and headless.loss is None
    torch.testing.assert_close(headless.final_hidden, reference.final_hidden)
    with pytest.raises(ValueError, match="targets hold 15 tokens"):
        model(tokens[:, :-1], labels, targets=tokens[:, :-1])


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
        torch.testing.assert_close(model(tokens, labels, attn_bias=visible).logits,
                                   model(tokens, labels, attn_bias=bias).logits, atol=1e-5, rtol=0)
        assert not torch.allclose(model(tokens, labels, attn_bias=visible).logits, model(tokens, labels).logits)


def test_non_finite_guard_reports_the_first_bad_step_only_when_asked():
    guard = NonFiniteGuard(("loss_ar", "loss"), "cpu")
    guard.record(torch.tensor([1.0, 2.0]), 1)
    assert guard.failure() is None
    guard.record(torch.tensor([float("nan"), 2.0]), 2)
    guard.record(torch.tensor([float("inf"), float("inf")]), 3)
    assert guard.failure() == "step 2: loss_ar = [nan]"
    assert guard.failure(lambda flags: flags * 0) is None  # no process is bad after the reduction: carry on
    other = NonFiniteGuard(("loss",), "cpu")
    assert other.failure(lambda flags: flags + 1) == "(another process)"


def run_steps(config, student, projector, star: bool, batch, steps: int = 2) -> list[float]:
    """Loss values of `steps` optimiser steps on one batch (fixed seeds)."""
    settings = StarSettings(contrastive_layer=1, num_positions=3)
    wrapped = StudentWithProjector(student, projector).train()
    teacher = make_teacher(getattr(student, "_orig_mod", student))
    optimizer = torch.optim.AdamW(wrapped.parameters(), lr=1e-3, fused=True)
    losses = []
    for step in range(steps):
        torch.manual_seed(step)
        terms = _forward_losses(batch, wrapped, teacher, settings if star else None, config,
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


def test_gpu_check_smoke_runs_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    result = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--smoke", "--out", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert {"training", "sampling", "tokenizer"} <= set(report)
    training = report["training"]
    assert training["eager_star_s"] > 0 and training["eager_plain_s"] > 0 and training["eager_llamagen_s"] > 0
    assert training["eager_star_over_plain"] == pytest.approx(training["eager_star_s"] / training["eager_plain_s"])
    assert report["sampling"]["batch4"]["speedup"] > 0 and report["tokenizer"]["images_per_s"] > 0


def test_benchmark_baseline_is_llamagens_computation():
    """The LlamaGen re-implementation the benchmark times computes what our model computes: same loss on the
    same weights, same tokens from the same sampler seed (so the speed ratios compare equal work)."""
    sys.path.insert(0, str(REPO / "bench"))
    from llamagen_ref import RefTransformer, ref_generate

    from star.gpt.generate import generate

    model = tiny_model(token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0, class_dropout_prob=0.0)
    ref = RefTransformer(model.config)
    ref.load_state_dict(model.state_dict())
    tokens, labels = torch.randint(0, 50, (3, 16)), torch.tensor([1, 4, 0])
    ref.train()  # LlamaGen's training path: full logits, sliced, contiguous, F.cross_entropy
    _, ref_loss = ref(tokens[:, :-1], labels, targets=tokens)
    torch.testing.assert_close(model.train()(tokens[:, :-1], labels, targets=tokens).loss, ref_loss)
    ref.eval()
    ours = generate(model, labels, cfg_scale=2.0, generator=torch.Generator().manual_seed(0))
    theirs = ref_generate(ref, labels, cfg_scale=2.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ours, theirs.long())


def test_bf16_step_benchmark_runs_every_contender_under_autocast(monkeypatch):
    """`make bench`'s bf16 rows: LlamaGen's step and ours both run under bf16 autocast (a contender left in fp32
    would make the ratio compare different precisions), at a tiny size so the suite stays fast."""
    sys.path.insert(0, str(REPO / "bench"))
    import step_bench

    linear_dtypes = set()
    original_linear = torch.nn.functional.linear

    def recording_linear(x, weight, bias=None):
        out = original_linear(x, weight, bias)
        linear_dtypes.add(out.dtype)
        return out

    monkeypatch.setattr(torch.nn.functional, "linear", recording_linear)
    result = step_bench.bench_train_steps(1, False, sizes={"tiny": {"dim": 32, "n_layer": 1, "n_head": 2}},
                                          bf16=True)["tiny"]
    assert linear_dtypes == {torch.bfloat16}  # every projection of all three steps ran in bf16
    assert result["precision"] == "bf16 autocast"
