"""The benchmarks compare equal work: LlamaGen's re-implementation computes what our model computes, the bf16
rows run every contender under autocast, and the GPU check runs (in its smoke mode) on a CPU."""
import json
import subprocess
import sys
from pathlib import Path

import torch
from test_training_step import tiny_model

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_runs_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    result = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--smoke", "--out", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert {"training", "sampling", "tokenizer"} <= set(report)
    training = report["training"]
    assert training["eager_star_s"] > 0 and training["eager_plain_s"] > 0 and training["eager_llamagen_s"] > 0
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


def test_recipe_step_benchmark_compares_steps_at_equal_images():
    """`make bench`'s recipe_steps row: the plain step on N images, ST-AR on N images x 2 views (twice the
    sequences), the cheaper one-view step on the plain step's own sequences; every ratio is against the plain
    step of the same run (a tiny size here)."""
    sys.path.insert(0, str(REPO / "bench"))
    import step_bench

    contenders = step_bench.RecipeContenders({"dim": 32, "n_layer": 2, "n_head": 2}, images=4)
    assert contenders.plain_batch.tokens.shape[:2] == (4, 1) and contenders.two_view_batch.tokens.shape[:2] == (4, 2)
    assert not contenders.one_view_star_settings.use_view and contenders.one_view_star_settings.use_step
    teacher_before = [p.clone() for p in contenders.teacher.parameters()]
    contenders.one_view_every_2_step()  # two optimizer steps, both updating the EMA teacher
    assert any(not torch.equal(a, b) for a, b in zip(teacher_before, contenders.teacher.parameters()))
    result = step_bench.bench_recipe_steps(1, {"dim": 32, "n_layer": 2, "n_head": 2}, images=4)
    assert set(result["seconds_per_step"]) == {"plain", "two_views", "one_view", "one_view_every_2"}
    plain = result["seconds_per_step"]["plain"]
    assert result["one_view_over_plain"] == result["seconds_per_step"]["one_view"] / plain
    assert result["chosen"] == "one_view" and result["chosen_over_plain"] == result["one_view_over_plain"]
