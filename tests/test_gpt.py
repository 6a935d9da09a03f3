"""LlamaGen GPT: parity with the original code's fixture, presets, RoPE traps, masks, checkpoints."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import FIXTURES  # noqa: E402
from reference import causal_bias, next_token_loss
from safetensors.torch import load_file

from star.gpt.config import GPT_PRESETS, GPTConfig
from star.gpt.model import GPT, count_parameters
from star.gpt.rotary import apply_rotary
from star.train.objectives import drop_class_labels
from star.weights import load_llamagen_gpt, load_llamagen_state_dict
from star.weights_io import load_gpt, save_gpt

CKPT = FIXTURES / "gpt_small.pt"
CONFIG_JSON = FIXTURES / "gpt_small.json"


@pytest.fixture(scope="module")
def fixture_io():
    return load_file(str(FIXTURES / "gpt_small_io.safetensors"))


@pytest.fixture(scope="module")
def small_model():
    return load_llamagen_gpt(CKPT, CONFIG_JSON)


def tiny_config(**overrides) -> GPTConfig:
    values = dict(dim=32, n_layer=3, n_head=2, vocab_size=40, num_classes=5, block_size=16, multiple_of=16,
                  token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0)
    values.update(overrides)
    return GPTConfig(**values)


def randomized_tiny_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    model = GPT(tiny_config(**overrides))
    torch.nn.init.normal_(model.output.weight, std=0.02)  # zero-initialised output would hide differences
    return model.eval()


# --- parity with the original LlamaGen code -------------------------------------------------------------------


@pytest.mark.parametrize("train_mode", [False, True])
def test_teacher_forced_logits_match_llamagen(small_model, fixture_io, train_mode):
    # dropouts are 0 in the fixture config; train mode must not drop labels (the trainer does that)
    small_model.train(train_mode)
    tokens, labels = fixture_io["input_tokens"], fixture_io["input_classes"]
    assert int(labels.max()) == small_model.config.null_class  # the fixture exercises the null class row
    with torch.no_grad():
        logits = small_model(tokens[:, :-1], labels).logits
    small_model.eval()
    assert logits.dtype == torch.float32
    assert logits.shape == fixture_io["teacher_forced_logits"].shape
    torch.testing.assert_close(logits, fixture_io["teacher_forced_logits"], atol=1e-4, rtol=0)


def test_model_never_drops_labels_in_train_mode(fixture_io):
    config = GPTConfig.resolve(CONFIG_JSON, class_dropout_prob=1.0)
    model = load_llamagen_gpt(CKPT, config)
    tokens, labels = fixture_io["input_tokens"][:, :-1], fixture_io["input_classes"]
    with torch.no_grad():
        model.train()
        train_logits = model(tokens, labels).logits
        model.eval()
        eval_logits = model(tokens, labels).logits
    torch.testing.assert_close(train_logits, eval_logits, atol=0, rtol=0)


def test_drop_class_labels():
    labels = torch.arange(8)
    assert torch.equal(drop_class_labels(labels, 0.0, null_class=10), labels)
    assert torch.equal(drop_class_labels(labels, 1.0, null_class=10), torch.full((8,), 10))
    first = drop_class_labels(torch.arange(1000) % 10, 0.3, 10, generator=torch.Generator().manual_seed(3))
    again = drop_class_labels(torch.arange(1000) % 10, 0.3, 10, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, again)
    dropped = (first == 10).float().mean().item()
    assert 0.25 < dropped < 0.35


# --- configuration ---------------------------------------------------------------------------------------------


# params for c2i with the 1001-row class table, llamagen.md §2.2
EXPECTED_MILLIONS = {"GPT-B": 110.9, "GPT-L": 342.9, "GPT-XL": 774.7, "GPT-XXL": 1411.0, "GPT-XXXL": 3893.0,
                     "GPT-1B": 1199.6, "GPT-3B": 3096.7, "GPT-7B": 6614.6}
EXPECTED_FFN = {"GPT-B": 2048, "GPT-L": 2816, "GPT-XL": 3584, "GPT-XXL": 4096, "GPT-XXXL": 6912,
                "GPT-1B": 5632, "GPT-3B": 8704, "GPT-7B": 11008}


@pytest.mark.parametrize("name", ["GPT-B", "GPT-L", "GPT-XL", "GPT-3B"])
def test_preset_parameter_counts(name):
    with torch.device("meta"):
        model = GPT(GPTConfig.resolve(name))
    assert round(count_parameters(model) / 1e6, 1) == EXPECTED_MILLIONS[name]
    assert model.cls_embedding.embedding_table.weight.shape[0] == 1001
    assert "freqs_cis" not in model.state_dict()
    assert len(model.state_dict()) == 2 + 7 * model.config.n_layer + 2


def test_ffn_width_rule():
    assert set(GPT_PRESETS) == set(EXPECTED_FFN)
    for name, width in EXPECTED_FFN.items():
        assert GPTConfig.resolve(name).ffn_hidden_dim == width
    assert GPTConfig.resolve("GPT-3B").head_dim == 100
    # fixture: dim 128, multiple_of 64 -> int(2*512/3) = 341 -> 384, as stored in the official checkpoint
    state = load_llamagen_state_dict(CKPT)
    assert state["layers.0.feed_forward.w1.weight"].shape == (GPTConfig.resolve(CONFIG_JSON).ffn_hidden_dim, 128)
    assert GPTConfig.resolve(CONFIG_JSON).ffn_hidden_dim == 384
    # multiplier applies after the 2/3 rule, before rounding: int(1.3 * 2048) = 2662 -> 2816
    assert GPTConfig.resolve("B", ffn_dim_multiplier=1.3).ffn_hidden_dim == 2816


def test_config_resolution(tmp_path):
    assert GPTConfig.resolve("B") == GPTConfig.resolve("GPT-B") == GPTConfig.resolve("gpt-b")
    assert GPTConfig.resolve("L", block_size=576).grid_size == 24
    fixture_config = GPTConfig.resolve(CONFIG_JSON)  # {"config": {...}, "note": ...}
    assert (fixture_config.dim, fixture_config.vocab_size, fixture_config.num_classes) == (128, 512, 10)
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps(fixture_config.to_dict()))
    assert GPTConfig.resolve(plain) == fixture_config
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"dim": 64, "n_layer": 2, "n_head": 2, "n_heads": 4, "colour": 1}))
    with pytest.raises(ValueError) as error:
        GPTConfig.resolve(bad)
    assert "bad.json" in str(error.value) and "colour" in str(error.value) and "n_heads" in str(error.value)
    with pytest.raises(ValueError, match="perfect square"):
        GPTConfig.resolve("B", block_size=255)
    with pytest.raises(FileNotFoundError, match="GPT-XL"):
        GPTConfig.resolve("GPT-Huge")
    with pytest.raises(ValueError, match="not fields"):
        GPTConfig.resolve("B", depth=3)


# --- RoPE and attention ----------------------------------------------------------------------------------------


def test_class_position_has_zero_rotary_and_zero_q_k():
    model = randomized_tiny_model()
    table = model.freqs_cis  # [1 + 16, hd/2, 2]
    assert table.shape == (17, 8, 2) and table.dtype == torch.float32
    assert torch.count_nonzero(table[0]) == 0  # cos = 0 AND sin = 0, not the identity
    torch.testing.assert_close(table[1, :, 0], torch.ones(8))  # token 0 at (0, 0): identity rotation
    grid, quarter = 4, 4
    row_step = table[1 + grid]  # token at (row 1, col 0): only the first hd/4 pairs rotate
    col_step = table[1 + 1]  # token at (row 0, col 1): only the last hd/4 pairs rotate
    assert torch.all(row_step[quarter:, 1] == 0) and torch.all(row_step[:quarter, 1] != 0)
    assert torch.all(col_step[:quarter, 1] == 0) and torch.all(col_step[quarter:, 1] != 0)
    torch.testing.assert_close(row_step, col_step.roll(-quarter, dims=0))
    # q and k of the class position are zero vectors in every layer; image positions are not
    captured = []
    for layer in model.layers:
        original = layer.attention._project
        layer.attention._project = (lambda f: lambda x, r: captured.append(f(x, r)) or captured[-1])(original)
    with torch.no_grad():
        model(torch.randint(0, 40, (2, 15)), torch.tensor([1, 5]))
    assert len(captured) == 3
    for q, k, v in captured:  # [B, H, S, hd]
        assert torch.count_nonzero(q[:, :, 0]) == 0 and torch.count_nonzero(k[:, :, 0]) == 0
        assert torch.count_nonzero(v[:, :, 0]) > 0 and torch.count_nonzero(q[:, :, 1]) > 0


def test_rotary_pairs_are_interleaved():
    x = torch.zeros(1, 1, 1, 8)
    x[..., 0] = 1.0  # pair 0 = (x[0], x[1]) = (1, 0)
    angle = 0.3
    rotary = torch.zeros(1, 4, 2)
    rotary[..., 0] = 1.0
    rotary[0, 0] = torch.tensor([math.cos(angle), math.sin(angle)])
    out = apply_rotary(x, rotary)
    expected = torch.zeros(1, 1, 1, 8)
    expected[..., 0], expected[..., 1] = math.cos(angle), math.sin(angle)
    torch.testing.assert_close(out, expected)


def test_causal_bias_equals_no_bias_and_key_mask_is_applied():
    model = randomized_tiny_model()
    tokens, labels = torch.randint(0, 40, (2, 15)), torch.tensor([0, 5])
    seq = 16
    with torch.no_grad():
        plain = model(tokens, labels).logits
        biased = model(tokens, labels, attn_mask=causal_bias(seq)).logits
        torch.testing.assert_close(biased, plain, atol=1e-5, rtol=0)
        # hide key 5 from every later query of sample 0 only
        bias = causal_bias(seq).repeat(2, 1, 1, 1)  # [B, 1, S, S]
        bias[0, 0, 6:, 5] = float("-inf")
        masked = model(tokens, labels, attn_mask=bias).logits
    torch.testing.assert_close(masked[1], plain[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(masked[0, :6], plain[0, :6], atol=1e-5, rtol=0)
    assert (masked[0, 6:] - plain[0, 6:]).abs().amax(dim=-1).min() > 1e-4
    assert causal_bias(3)[0, 1] == float("-inf") and causal_bias(3)[1, 0] == 0


def test_return_layers_and_final_hidden():
    model = randomized_tiny_model()
    tokens, labels = torch.randint(0, 40, (2, 10)), torch.tensor([2, 5])
    with torch.no_grad():
        out = model(tokens, labels, return_layers=(1, 3), return_final_hidden=True)
        embedded = torch.cat([model.cls_embedding(labels), model.tok_embeddings(tokens)], dim=1)
        after_first = model.layers[0](embedded, model.freqs_cis[:11], None)
    assert set(out.hidden) == {1, 3}
    assert out.hidden[1].shape == out.hidden[3].shape == out.final_hidden.shape == (2, 11, 32)
    torch.testing.assert_close(out.hidden[1], after_first)  # 1-based: after the first block
    torch.testing.assert_close(model.norm(out.hidden[3]), out.final_hidden)
    torch.testing.assert_close(model.output(out.final_hidden), out.logits)
    assert model(tokens, labels).final_hidden is None


def test_next_token_loss_matches_hand_computation():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)  # [B, S, V], S = 1 + (T - 1)
    tokens = torch.randint(0, 7, (2, 5))  # [B, T]
    expected = torch.stack(
        [-F.log_softmax(logits[b, t], dim=-1)[tokens[b, t]] for b in range(2) for t in range(5)]
    ).mean()
    torch.testing.assert_close(next_token_loss(logits, tokens), expected)
    assert math.isclose(next_token_loss(torch.zeros(1, 4, 16384), torch.zeros(1, 4, dtype=torch.long)).item(),
                        math.log(16384), rel_tol=1e-6)


def test_rotary_table_survives_dtype_casts():
    model = randomized_tiny_model()
    reference = model.freqs_cis.clone()
    model.to(torch.bfloat16)
    assert model.freqs_cis.dtype == torch.float32
    assert torch.equal(model.freqs_cis, reference)
    assert model.tok_embeddings.weight.dtype == torch.bfloat16


# --- checkpoints -----------------------------------------------------------------------------------------------


def test_loading_strips_prefixes_and_stray_keys(tmp_path, fixture_io, small_model):
    official = torch.load(CKPT, weights_only=True)["model"]
    messy = {f"module._orig_mod.{k}": v for k, v in official.items()}
    messy["freqs_cis"] = torch.zeros(65, 16, 2)
    messy["module.layers.0.attention.kv_cache.k_cache"] = torch.zeros(2, 4, 72, 32)
    raw_path = tmp_path / "fsdp_raw.pt"
    torch.save(messy, raw_path)  # FSDP-style raw state dict, no container
    wrapped_path = tmp_path / "wrapped.pt"
    torch.save({"module": messy}, wrapped_path)
    for path in (raw_path, wrapped_path):
        model = load_llamagen_gpt(path, CONFIG_JSON)
        with torch.no_grad():
            logits = model(fixture_io["input_tokens"][:, :-1], fixture_io["input_classes"]).logits
        torch.testing.assert_close(logits, fixture_io["teacher_forced_logits"], atol=1e-4, rtol=0)


def test_wrong_size_checkpoint_gives_clear_error():
    with pytest.raises(ValueError) as error:
        load_llamagen_gpt(CKPT, GPTConfig.resolve(CONFIG_JSON, vocab_size=1024))
    message = str(error.value)
    assert str(CKPT) in message and "vocab_size=1024" in message
    assert "tok_embeddings.weight: checkpoint (512, 128) vs model (1024, 128)" in message
    assert "vocab_size differs (checkpoint 512, config 1024)" in message
    with pytest.raises(ValueError, match=r"num_classes differs .*11 rows"):
        load_llamagen_gpt(CKPT, GPTConfig.resolve(CONFIG_JSON, num_classes=1000))
    with pytest.raises(ValueError, match=r"missing key.*layers\.2\.(.|\n)*n_layer differs \(checkpoint 2, config 3\)"):
        load_llamagen_gpt(CKPT, GPTConfig.resolve(CONFIG_JSON, n_layer=3))


def test_save_and_load_round_trip(tmp_path, fixture_io, small_model):
    tokens, labels = fixture_io["input_tokens"][:, :-1], fixture_io["input_classes"]
    with torch.no_grad():
        reference = small_model(tokens, labels).logits
    for target in (tmp_path / "run", tmp_path / "weights.safetensors"):
        weights_path = save_gpt(small_model, target)
        assert weights_path.is_file()
        loaded = load_gpt(target)
        assert loaded.config == small_model.config and not loaded.training
        with torch.no_grad():
            assert torch.equal(loaded(tokens, labels).logits, reference)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["config"]["dim"] == 128
