"""Stage three: sampling output format and determinism, the official-checkpoint path, probes and attention stats."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CPU_ENV, TWO_CPU_PROCESSES  # noqa: E402

from star.eval.sample import SampleConfig, run_sampling, sample_labels
from star.eval.understanding import attention_maps, attention_statistics, linear_probe_accuracy
from star.gpt.generate import SamplingSettings
from star.gpt.model import GPT, GPTConfig
from star.weights_io import save_gpt

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def tiny_generator(tmp_path, tiny_gpt_json):
    torch.manual_seed(0)
    model = GPT(GPTConfig.resolve(tiny_gpt_json))
    torch.nn.init.normal_(model.output.weight, std=0.05)  # LlamaGen zero-inits the head: make sampling non-trivial
    save_gpt(model, tmp_path / "gpt")
    return tmp_path / "gpt"


def test_sampling_writes_adm_npz_grid_and_is_seeded(tmp_path, tiny_generator, small_vq):
    settings = dict(ckpt=str(tiny_generator), vq_ckpt=str(small_vq[0]), vq_config=str(small_vq[1]),
                    sampling=SamplingSettings(cfg_scale=2.0), num_samples=7, batch_size=3, seed=5, progress=False)
    run_sampling(SampleConfig(out=str(tmp_path / "a"), **settings))
    run_sampling(SampleConfig(out=str(tmp_path / "b"), **{**settings, "batch_size": 3}))
    run_sampling(SampleConfig(out=str(tmp_path / "c"), **{**settings, "seed": 6}))
    a, b, c = (np.load(tmp_path / name / "samples.npz") for name in "abc")
    assert a["arr_0"].dtype == np.uint8 and a["arr_0"].shape == (7, 32, 32, 3)
    assert a["labels"].tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert np.array_equal(a["arr_0"], b["arr_0"])
    assert not np.array_equal(a["arr_0"], c["arr_0"])
    assert (tmp_path / "a" / "grid.png").is_file()
    assert json.loads((tmp_path / "a" / "settings.json").read_text())["sampling"]["cfg_scale"] == 2.0


def test_sampling_settings_are_flags_with_the_commands_help(capsys):
    import argparse
    import dataclasses

    from star.cli import add_config_flags, parse_config
    from star.eval.sample import SAMPLING_FLAGS

    assert set(SAMPLING_FLAGS) == {f.name for f in dataclasses.fields(SamplingSettings)}  # every one has its help
    parser = argparse.ArgumentParser()
    add_config_flags(parser, SampleConfig)
    help_text = " ".join(parser.format_help().split())
    assert "--cfg-scale CFG_SCALE classifier-free guidance scale (1.0 = off) (default: 1.0)" in help_text
    assert "--compile, --no-compile torch.compile the decode step" in help_text
    required = ["--ckpt", "c", "--out", "o", "--tokens-only"]
    config = parse_config(SampleConfig, required + ["--cfg-scale", "2", "--compile", "--decode", "static",
                                                    "--cfg-schedule", "linear"])
    assert config.sampling == SamplingSettings(cfg_scale=2.0, compile_decode=True, decode="static",
                                               cfg_schedule="linear")
    with pytest.raises(SystemExit):
        parse_config(SampleConfig, required + ["--decode", "fast"])
    assert "--decode: invalid choice: 'fast'" in capsys.readouterr().err


def test_official_checkpoint_tokens_only_matches_greedy_fixture(tmp_path, fixtures_dir):
    from safetensors.torch import load_file

    reference = load_file(fixtures_dir / "gpt_small_io.safetensors")
    classes = ",".join(str(int(c)) for c in reference["sample_classes"])
    run_sampling(SampleConfig(ckpt=str(fixtures_dir / "gpt_small.pt"), model=str(fixtures_dir / "gpt_small.json"),
                              out=str(tmp_path), tokens_only=True, sampling=SamplingSettings(cfg_scale=2.0, top_k=1),
                              classes=classes,
                              num_samples=4, batch_size=4, save_tokens=str(tmp_path / "t.npy"), progress=False))
    assert np.array_equal(np.load(tmp_path / "t.npy"), reference["greedy_tokens_cfg2"].numpy())
    with pytest.raises(ValueError, match="give --model"):
        run_sampling(SampleConfig(ckpt=str(fixtures_dir / "gpt_small.pt"), out=str(tmp_path / "x"), tokens_only=True))


def test_two_process_sampling_equals_one_process(tmp_path, tiny_generator, small_vq):
    common = ["--ckpt", str(tiny_generator), "--vq-ckpt", str(small_vq[0]), "--vq-config", str(small_vq[1]),
              "--num-samples", "6", "--batch-size", "2", "--cfg-scale", "1.5", "--no-progress"]
    env = {**os.environ, **CPU_ENV}
    single = subprocess.run([sys.executable, str(REPO / "evaluate" / "run.py"), "sample", *common, "--out",
                             str(tmp_path / "one")], env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    double = subprocess.run([sys.executable, *TWO_CPU_PROCESSES, str(REPO / "evaluate" / "run.py"), "sample", *common, "--out", str(tmp_path / "two")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert double.returncode == 0, double.stderr[-2000:]
    one, two = np.load(tmp_path / "one" / "samples.npz"), np.load(tmp_path / "two" / "samples.npz")
    assert np.array_equal(one["arr_0"], two["arr_0"]) and np.array_equal(one["labels"], two["labels"])


def test_sample_labels_balanced_or_given():
    assert sample_labels(5, 3, []).tolist() == [0, 1, 2, 0, 1]
    assert SampleConfig(ckpt="run", out="o", tokens_only=True, classes="7, 2").class_ids == [7, 2]
    assert sample_labels(4, 10, [7, 2]).tolist() == [7, 2, 7, 2]
    with pytest.raises(ValueError, match=r"--classes \[12\] outside 0..9"):
        sample_labels(2, 10, [12])
    with pytest.raises(ValueError, match="--classes 3,-1: ids >= 0"):  # on creation, before any model is loaded
        SampleConfig(ckpt="run", out="o", tokens_only=True, classes="3,-1")


def test_attention_statistics_on_a_hand_made_map():
    grid, seq = 3, 9  # class + 8 image inputs (tokens 0..7 of a 3x3 grid)
    weights = torch.zeros(seq, seq)
    weights[:, 0] = 0.5
    # Query at position 5 holds cell 4 = (1, 1): visible neighbours (0,0),(0,1),(0,2),(1,0) = keys 1,2,3,4.
    weights[5, 1:5] = 0.125
    stats = attention_statistics(weights, grid)
    assert stats["class_mass"] == pytest.approx(0.5)
    assert stats["neighbour_mass"] == pytest.approx(0.5 / 8)


def test_attention_maps_are_causal_distributions(tiny_gpt_json):
    torch.manual_seed(0)
    model = GPT(GPTConfig.resolve(tiny_gpt_json))
    tokens = np.random.default_rng(0).integers(0, 256, (3, 64))
    maps = attention_maps(model, tokens, np.array([0, 1, 2]), [1, 2])
    for weights in maps.values():
        assert weights.shape == (64, 64)
        assert torch.allclose(weights.sum(-1), torch.ones(64), atol=1e-5)
        assert weights.triu(1).abs().max() == 0
        # The class position's key is the zero vector (zero RoPE rows): its logit is 0 for every query.
        assert weights[0, 0] == pytest.approx(1.0)


def test_linear_probe_separates_separable_features_and_not_noise():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 200)
    centres = rng.normal(0, 1, (4, 16)) * 4
    features = centres[labels] + rng.normal(0, 1, (200, 16))
    assert linear_probe_accuracy(features[:150], labels[:150], features[150:], labels[150:]) > 0.95
    noise = rng.normal(0, 1, (200, 16))
    assert linear_probe_accuracy(noise[:150], labels[:150], noise[150:], labels[150:]) < 0.5


# ---------------------------------------------------------------------------------------------------------
# Settings are checked before any work, and the command is only argument handling


def evaluate_main(argv):
    """evaluate/run.py's main() in this process (the folder is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("evaluate_run", REPO / "evaluate" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


@pytest.mark.parametrize("flags, message", [
    (["--num-samples", "0"], "--num-samples 0"),
    (["--num-samples", "-3"], "--num-samples -3"),
    (["--batch-size", "0"], "--batch-size 0"),
    (["--cfg-scale", "nan"], "--cfg-scale nan"),
    (["--temperature", "-1"], "--temperature -1"),
    (["--top-p", "0"], "--top-p 0"),
    (["--device", "gpu"], "--device 'gpu'"),
])
def test_sample_rejects_bad_settings_before_touching_the_output(tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    out.mkdir()
    np.savez(out / "samples.npz", arr_0=np.ones((2, 4, 4, 3), np.uint8))
    before = (out / "samples.npz").read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        evaluate_main(["sample", "--ckpt", str(tmp_path / "missing"), "--vq-ckpt", "vq.pt", "--out", str(out), *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert (out / "samples.npz").read_bytes() == before  # the earlier samples are intact
    assert sorted(p.name for p in out.iterdir()) == ["samples.npz"]


def test_sample_config_checks_library_callers_too():
    with pytest.raises(ValueError, match="--weights 'ema'"):
        SampleConfig(ckpt="run", out="o", vq_ckpt="vq.pt", weights="ema")
    with pytest.raises(ValueError, match="--precision 'fp16'"):
        SampleConfig(ckpt="run", out="o", tokens_only=True, precision="fp16")
    assert SampleConfig(ckpt="run", out="o", tokens_only=True, sampling={"cfg_scale": 2.0}).sampling.cfg_scale == 2.0


def test_sampling_refuses_another_tokenizer_unless_allowed(tmp_path, tiny_generator, small_vq):
    (tiny_generator / "meta.json").write_text(json.dumps({"step": 1, "tokenizer_sha256": "0" * 64}))
    settings = dict(ckpt=str(tiny_generator), vq_ckpt=str(small_vq[0]), vq_config=str(small_vq[1]), num_samples=2,
                    batch_size=2, progress=False)
    with pytest.raises(ValueError, match="not the tokenizer .* --allow-other-tokenizer"):
        run_sampling(SampleConfig(out=str(tmp_path / "refused"), **settings))
    assert not (tmp_path / "refused" / "samples.npz").exists()
    with pytest.warns(UserWarning, match="sampling anyway"):
        run_sampling(SampleConfig(out=str(tmp_path / "allowed"), allow_other_tokenizer=True, **settings))
    recorded = json.loads((tmp_path / "allowed" / "settings.json").read_text())["resolved"]["tokenizer_check"]
    assert recorded.startswith("differs")
    # the right VQ passes without a flag
    from star.io import sha256_file

    (tiny_generator / "meta.json").write_text(json.dumps({"step": 1, "tokenizer_sha256": sha256_file(small_vq[0])}))
    run_sampling(SampleConfig(out=str(tmp_path / "same"), **settings))
    assert json.loads((tmp_path / "same" / "settings.json").read_text())["resolved"]["tokenizer_check"].startswith(
        "matches")


def test_sampling_checks_the_codebook_covers_the_vocabulary_first(tmp_path, tiny_gpt_json, small_vq, monkeypatch):
    import star.eval.sample as sample_module

    config = {**json.loads(tiny_gpt_json.read_text()), "vocab_size": 512}  # the small VQ has 256 codes
    save_gpt(GPT(GPTConfig.resolve(config)), tmp_path / "big_vocab")
    monkeypatch.setattr(sample_module, "generate", lambda *a, **k: pytest.fail("sampled before checking"))
    with pytest.raises(ValueError, match="codebook of 256 codes cannot decode the model's vocabulary of 512"):
        run_sampling(SampleConfig(ckpt=str(tmp_path / "big_vocab"), out=str(tmp_path / "o"), vq_ckpt=str(small_vq[0]),
                                  vq_config=str(small_vq[1]), num_samples=2, progress=False))


def test_probe_and_attention_settings_are_checked(tiny_gpt_json):
    from star.eval.understanding import AnalysisModel, AttentionConfig, ProbeConfig

    generator = AnalysisModel(ckpt="run")
    model = GPT(GPTConfig.resolve(tiny_gpt_json))  # 2 layers, 64 positions
    with pytest.raises(ValueError, match="positions start at 1"):
        ProbeConfig(generator, shards="s", eval_shards="e", out="o", positions="0,8")
    with pytest.raises(ValueError, match=r"--positions \[65\]: positions are 1..64"):
        ProbeConfig(generator, shards="s", eval_shards="e", out="o", positions="8,65").resolve(model)
    assert ProbeConfig(generator, shards="s", eval_shards="e", out="o").resolve(model) == (1, [8, 16, 24, 32, 40, 48,
                                                                                             56, 64])
    with pytest.raises(ValueError, match="layers are numbered from 1"):
        AttentionConfig(generator, shards="s", out="o", layers="0")
    with pytest.raises(ValueError, match="layers are numbered from 1"):
        AttentionConfig(generator, shards="s", out="o", layers="-1")
    with pytest.raises(ValueError, match=r"--layers \[3\]: the model's layers are 1..2"):
        AttentionConfig(generator, shards="s", out="o", layers="1,3").resolve(model)
    with pytest.raises(ValueError, match="--weights 'ema'"):
        AnalysisModel(ckpt="run", weights="ema")


def test_probe_limit_below_the_class_count_is_an_error(tmp_path, tiny_generator, tiny_shards, capsys):
    code = evaluate_main(["probe", "--ckpt", str(tiny_generator), "--shards", str(tiny_shards), "--eval-shards",
                          str(tiny_shards), "--limit", "1", "--positions", "8", "--out", str(tmp_path / "probe")])
    assert code == 2
    assert "--limit 1 is fewer than the 3 classes" in capsys.readouterr().err
    assert not (tmp_path / "probe").exists()


def test_probe_and_attention_commands_write_their_results(tmp_path, tiny_generator, tiny_shards, capsys):
    assert evaluate_main(["probe", "--ckpt", str(tiny_generator), "--shards", str(tiny_shards), "--eval-shards",
                          str(tiny_shards), "--positions", "4,64", "--out", str(tmp_path / "probe")]) == 0
    result = json.loads((tmp_path / "probe" / "probe.json").read_text())
    assert [row["step"] for row in result["rows"]] == [4, 64] and result["layer"] == 1
    assert (tmp_path / "probe" / "probe.png").is_file()
    assert evaluate_main(["attention", "--ckpt", str(tiny_generator), "--shards", str(tiny_shards), "--layers", "2",
                          "--positions", "10,20", "--samples", "4", "--out", str(tmp_path / "attention")]) == 0
    stats = json.loads((tmp_path / "attention" / "attention.json").read_text())
    assert list(stats["layers"]) == ["2"] and stats["positions"] == [10, 20]
    assert "mass on class" in capsys.readouterr().out
