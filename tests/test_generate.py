"""Sampling: greedy parity with LlamaGen, KV cache == full forward, CFG arithmetic, filters, determinism."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from star.gpt.generate import SamplingSettings, generate, sample_logits
from star.gpt.model import GPT, GPTConfig
from star.weights import load_llamagen_gpt


@pytest.fixture(scope="module")
def fixture_io(fixtures_dir):
    return load_file(str(fixtures_dir / "gpt_small_io.safetensors"))


@pytest.fixture(scope="module")
def model(fixtures_dir):
    return load_llamagen_gpt(fixtures_dir / "gpt_small.pt", fixtures_dir / "gpt_small.json")


@pytest.fixture(scope="module")
def tiny_model():
    """A random model with a 4x4 grid: cheap enough for many generations."""
    torch.manual_seed(0)
    config = GPTConfig(dim=32, n_layer=2, n_head=2, vocab_size=64, num_classes=5, block_size=16, multiple_of=16)
    tiny = GPT(config)
    torch.nn.init.normal_(tiny.output.weight, std=1.0)  # spread the logits (the default init zeroes them)
    return tiny.eval()


@pytest.mark.parametrize("cfg_scale, key", [(2.0, "greedy_tokens_cfg2"), (1.0, "greedy_tokens_nocfg")])
def test_greedy_tokens_match_llamagen(model, fixture_io, cfg_scale, key):
    tokens = generate(model, fixture_io["sample_classes"], cfg_scale=cfg_scale, top_k=1)
    assert tokens.dtype == torch.long and tokens.shape == (4, 64)
    assert torch.equal(tokens, fixture_io[key])


def test_kv_cache_decoding_equals_full_forward(model, fixture_io):
    labels = torch.tensor([0, 3, 10])  # includes the null class
    tokens = generate(model, labels, generator=torch.Generator().manual_seed(0))  # [3, 64] sampled
    with torch.no_grad():
        full = model(tokens[:, :-1], labels).logits  # [3, 64, V]
    with torch.inference_mode():
        model.setup_kv_cache(6, 65, torch.float32, "cpu")  # a larger cache than needed: rows 0..2 are used
        cached = [model.forward_cached(None, labels, torch.tensor([0]), cache_len=1)[:, -1]]
        for step in range(63):
            cached.append(model.forward_cached(tokens[:, step : step + 1], None, torch.tensor([step + 1]),
                                               cache_len=step + 2)[:, -1])
        cached = torch.stack(cached, dim=1)  # [3, 64, V]
        # a prefill of class + 10 known tokens in one call (the multi-position mask path), then one step
        prefix = model.forward_cached(tokens[:, :10], labels, torch.arange(11), cache_len=11)  # [3, 11, V]
        after = model.forward_cached(tokens[:, 10:11], None, torch.tensor([11]), cache_len=12)[:, -1]
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=0)
    torch.testing.assert_close(prefix, full[:, :11], atol=1e-4, rtol=0)
    torch.testing.assert_close(after, full[:, 11], atol=1e-4, rtol=0)


@pytest.mark.parametrize("settings", [
    dict(cfg_scale=2.0, top_p=0.9),
    dict(cfg_scale=3.0, cfg_schedule="linear", cfg_interval=6, temperature=0.7, top_k=20),
    dict(cfg_scale=1.0),
])
def test_static_decode_is_token_exact_against_dynamic(model, settings):
    labels = torch.tensor([0, 3, 7, 9])
    tokens = {mode: generate(model, labels, generator=torch.Generator().manual_seed(11), decode=mode, **settings)
              for mode in ("dynamic", "static")}
    assert torch.equal(tokens["static"], tokens["dynamic"])
    # the draws were random (not all argmax), so agreement is not trivial
    greedy = generate(model, labels, top_k=1, decode="dynamic", **{k: v for k, v in settings.items() if k != "top_k"})
    assert not torch.equal(tokens["dynamic"], greedy)


def test_static_step_has_fixed_shapes_and_no_host_sync(tiny_model):
    """The static step traces into ONE graph (no graph break, e.g. from reading a position back to the host)
    and is not retraced when the position advances, so a CUDA graph can replay it token after token."""
    import torch._dynamo

    from star.gpt.generate import model_step

    model = tiny_model
    torch._dynamo.reset()
    traces = []

    def counting_backend(graph_module, example_inputs):
        traces.append(graph_module)
        return graph_module.forward

    step = torch.compile(model_step, backend=counting_backend, fullgraph=True, dynamic=False)
    with torch.inference_mode():
        model.setup_kv_cache(2, 17, torch.float32, "cpu")
        model.forward_cached(None, torch.tensor([1, 2]), torch.tensor([0]), cache_len=None)  # static
        input_pos = torch.tensor([1])
        token = torch.tensor([[3], [4]])
        expected = []
        for _ in range(4):
            compiled_logits = step(model, token, None, input_pos, None)
            expected.append(model_step(model, token, None, input_pos, None))  # rewrites the same slot: same values
            torch.testing.assert_close(compiled_logits, expected[-1])
            input_pos += 1
    assert len(traces) == 1
    torch._dynamo.reset()


def test_decode_mode_is_chosen_by_device_and_validated():
    assert SamplingSettings(decode="auto").decode_mode(torch.device("cpu")) == "dynamic"
    assert SamplingSettings(decode="auto").decode_mode(torch.device("cuda")) == "static"
    assert SamplingSettings(decode="static").decode_mode(torch.device("cpu")) == "static"
    with pytest.raises(ValueError, match="--decode 'graph'; choose one of auto, static, dynamic"):
        SamplingSettings(decode="graph")


def test_cfg_schedule_and_interval_follow_the_formula(tiny_model):
    model = tiny_model
    labels = torch.tensor([0, 1, 2, 3, 4, 4])
    scale, interval = 3.0, 8
    tokens = generate(model, labels, cfg_scale=scale, cfg_schedule="linear", cfg_interval=interval, top_k=1)
    with torch.no_grad():
        cond = model(tokens[:, :-1], labels).logits  # [B, 16, V]
        uncond = model(tokens[:, :-1], torch.full_like(labels, model.config.null_class)).logits
    for step in range(16):
        guided = step == 0 or step - 1 <= interval
        s = 1.0 + (scale - 1.0) * step / 15
        expected = uncond[:, step] + s * (cond[:, step] - uncond[:, step]) if guided else cond[:, step]
        chosen = expected.gather(1, tokens[:, step : step + 1]).squeeze(1)
        assert torch.all(chosen >= expected.max(dim=1).values - 1e-4), f"step {step} is not the guided argmax"
    constant = generate(model, labels, cfg_scale=scale, cfg_interval=interval, top_k=1)
    assert not torch.equal(constant, tokens)  # the schedule matters, so the check above is discriminating
    assert not torch.equal(generate(model, labels, cfg_scale=scale, cfg_schedule="linear", top_k=1), tokens)
    linear = SamplingSettings(cfg_scale=3.0, cfg_schedule="linear")
    assert linear.cfg_scale_at(0, 64) == 1.0 and linear.cfg_scale_at(63, 64) == 3.0
    assert SamplingSettings(cfg_scale=3.0).cfg_scale_at(5, 64) == 3.0
    with pytest.raises(ValueError, match="cfg-schedule"):
        generate(model, labels, cfg_scale=2.0, cfg_schedule="cosine")


def test_batch_is_doubled_only_under_cfg(tiny_model):
    model = tiny_model
    labels = torch.tensor([1, 2])
    batch_sizes = []
    original = model.forward_cached

    def recording(tokens, labels, input_pos, cache_len):
        batch_sizes.append((tokens if tokens is not None else labels).shape[0])
        return original(tokens, labels, input_pos, cache_len)

    model.forward_cached = recording
    try:
        generate(model, labels, cfg_scale=1.0, top_k=1)
        assert set(batch_sizes) == {2} and len(batch_sizes) == 16
        batch_sizes.clear()
        generate(model, labels, cfg_scale=2.0, top_k=1)
        assert set(batch_sizes) == {4}
        batch_sizes.clear()
        generate(model, labels, cfg_scale=2.0, cfg_interval=5, top_k=1)
        assert batch_sizes == [4] * 7 + [2] * 9  # CFG off after decode step 5; the null half is dropped
    finally:
        del model.forward_cached


def test_same_seed_same_samples_and_mode_restored(tiny_model):
    model = tiny_model
    labels = torch.tensor([0, 1, 2, 3])
    model.train()
    first = generate(model, labels, cfg_scale=1.5, top_p=0.9, generator=torch.Generator().manual_seed(7))
    assert model.training  # previous mode restored
    model.eval()
    again = generate(model, labels, cfg_scale=1.5, top_p=0.9, generator=torch.Generator().manual_seed(7))
    other = generate(model, labels, cfg_scale=1.5, top_p=0.9, generator=torch.Generator().manual_seed(8))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    first[0, 0] = 0  # a normal tensor, not an inference-mode one


def _draws(logits: torch.Tensor, n: int = 4000, **kwargs) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return sample_logits(logits.expand(n, -1), SamplingSettings(**kwargs), generator)


def test_top_k_and_top_p_keep_the_right_tokens():
    probs = torch.tensor([0.10, 0.50, 0.05, 0.20, 0.15])  # order by probability: 1, 3, 4, 0, 2
    logits = probs.log()[None]  # [1, V]
    assert set(_draws(logits).tolist()) == {0, 1, 2, 3, 4}  # no filtering by default
    assert set(_draws(logits, top_k=2).tolist()) == {1, 3}
    assert set(_draws(logits, top_k=3).tolist()) == {1, 3, 4}
    assert set(_draws(logits, top_p=0.6).tolist()) == {1, 3}  # 0.5 < 0.6 keeps the 2nd, 0.7 > 0.6 drops the 3rd
    assert set(_draws(logits, top_p=0.8).tolist()) == {1, 3, 4}
    assert set(_draws(logits, top_p=0.3).tolist()) == {1}
    assert set(_draws(logits, top_p=1e-9).tolist()) == {1}  # at least one token survives
    assert set(_draws(logits, top_k=4, top_p=0.8).tolist()) == {1, 3, 4}
    draws = _draws(logits, top_k=2)
    assert abs((draws == 1).float().mean().item() - 0.5 / 0.7) < 0.03  # renormalised over the kept tokens
    assert set(_draws(logits, temperature=1e-6).tolist()) == {1}
    batch = torch.randn(6, 50)
    assert torch.equal(sample_logits(batch, SamplingSettings(top_k=1)), batch.argmax(dim=1))
    with pytest.raises(ValueError, match="--top-p 0.0 must be in"):
        SamplingSettings(top_p=0.0)
    with pytest.raises(ValueError, match="--top-k -1 must be >= 0"):
        SamplingSettings(top_k=-1)
