"""`make demo`: ST-AR and its LlamaGen baseline on a Fashion-MNIST subset shipped with the repository, on a CPU,
in a few minutes.

data (star/demo_data: 400 training and 100 held-out images per class; by default the demo uses 80 and 40) -> the
committed VQ tokenizer (no training) -> ten-crop token shards -> a small GPT trained with ST-AR and the same GPT without it -> CFG samples (a row per
class) -> FID and KID against the held-out images, with the tokenizer's reconstructions as the ceiling and real
against real as the floor -> a linear probe per sequence position -> runs/demo/summary.md. Each stage is the library code
the stage commands call; each is skipped or resumed when its outputs are there, so an interrupted `make demo`
continues where it stopped.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from star.cli import parse_config
from star.data.builtin import DEMO_DATA, DEMO_SUBSET
from star.io import atomic_path, sha256_file, write_json_atomic
from star.settings import check, setting

DEMO_VQ = DEMO_DATA / "vq.pt"
DEMO_VQ_CONFIG = DEMO_DATA / "vq.json"
IMAGE_SIZE = 32  # Fashion-MNIST's 28 px with a 2 px border: 8x8 tokens through the downsample-4 VQ
GPT_SIZES = {  # "tiny" is for tests: seconds per stage
    "small": {"dim": 128, "n_layer": 4, "n_head": 4},
    "tiny": {"dim": 32, "n_layer": 2, "n_head": 2},
}
GPT_COMMON = {"block_size": 64, "multiple_of": 64, "token_dropout_p": 0.1, "resid_dropout_p": 0.1,
              "ffn_dropout_p": 0.1}
PROBE_STEPS = [1, 8, 16, 24, 32, 40, 48, 56, 64]  # step t = sequence position t - 1
CEILING = "VQ reconstructions (ceiling)"
RERUN = "`make demo` (or the same python -m star.demo command)"


@dataclass
class DemoConfig:
    """Settings of `python -m star.demo` (`make demo`)."""

    out: str = setting("runs/demo", help="folder for every output (shards, runs, samples, summary.md)")
    data: str = setting("data/demo-fashion-mnist", help="where the subset is written as an ImageFolder")
    subset: str = setting(str(DEMO_SUBSET), help="the Fashion-MNIST subset .npz (star/data/builtin.py's format)")
    vq_ckpt: str = setting(str(DEMO_VQ), help="VQ checkpoint trained on the subset (committed beside it)")
    vq_config: str = setting(str(DEMO_VQ_CONFIG), help="its VQ config JSON")
    train_per_class: int = setting(80, help="training images per class, ten crops each (0: all 400 of the subset's)")
    val_per_class: int = setting(40, help="held-out images per class (0: all 100 of the subset's)")
    gpt: str = setting("small", choices=tuple(GPT_SIZES), help="GPT size: small (dim 128, 4 layers) or tiny (tests)")
    steps: int = setting(300, help="training steps of each GPT")
    batch_size: int = setting(32, help="images per training step")
    lr: float = setting(1e-3, help="AdamW learning rate")
    samples_per_class: int = setting(20, help="samples per class, scored against the held-out images")
    cfg_scale: float = setting(2.0, help="classifier-free guidance scale of the samples")
    baseline: bool = setting(True, help="also train the GPT without ST-AR (--no-baseline: ST-AR only)")
    seed: int = setting(0, help="training and sampling seed (a seed other than 0 gets its own run folders)")
    view_match: str = setting("index", choices=("index", "geometry"),
                              help="ST-AR's L_view matching: raster index (the paper) or crop geometry")
    precision: str = setting("auto", choices=("auto", "fp32", "bf16"),
                             help="of the tokenizer, the GPTs and Inception; auto: bf16 on a CPU with AMX-BF16 "
                                  "(twice as fast there), else fp32")
    probe: bool = setting(True, help="linear probe per step of each GPT's middle layer")

    def __post_init__(self) -> None:
        check(self.steps > 0, f"--steps {self.steps}: must be > 0")
        check(self.batch_size > 0, f"--batch-size {self.batch_size}: must be > 0")
        check(self.lr > 0, f"--lr {self.lr}: must be > 0")
        check(self.samples_per_class > 0, f"--samples-per-class {self.samples_per_class}: must be > 0")
        check(self.train_per_class >= 0, f"--train-per-class {self.train_per_class}: must be >= 0 (0: all)")
        check(self.val_per_class >= 0, f"--val-per-class {self.val_per_class}: must be >= 0 (0: all)")
        for flag, path in (("--subset", self.subset), ("--vq-ckpt", self.vq_ckpt), ("--vq-config", self.vq_config)):
            check(Path(path).is_file(), f"{flag} {path}: not found (the demo's files are committed under "
                                        f"{DEMO_DATA}; git checkout -- star/demo_data)")


def banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


class Demo:
    """The demo's folders and the stages over them, in the order `run` calls them."""

    def __init__(self, config: DemoConfig):
        self.config = config
        self.root, self.data = Path(config.out), Path(config.data)
        self.timings: dict[str, float] = {}
        self.class_names: list[str] = []
        self.gpt_config = {**GPT_SIZES[config.gpt], **GPT_COMMON}
        self.precision = resolve_demo_precision(config.precision)
        self._scorer: Scorer | None = None

    def timed(self, name: str, fn, *args):
        started = time.time()
        result = fn(*args)
        self.timings[name] = time.time() - started
        return result

    # -- inputs ------------------------------------------------------------------------------------------------

    def check_inputs(self) -> None:
        """Refuse a run folder made from other data or another tokenizer (its shards and runs would not match)."""
        config = self.config
        inputs = {"subset_sha256": sha256_file(config.subset), "vq_sha256": sha256_file(config.vq_ckpt),
                  "train_per_class": config.train_per_class, "val_per_class": config.val_per_class, "gpt": config.gpt,
                  "precision": self.precision}  # bf16 and fp32 encoders give slightly different tokens
        record = self.root / "demo_inputs.json"
        if record.is_file() and json.loads(record.read_text()) != inputs:
            raise ValueError(f"{self.root} holds a demo made from other inputs (see {record}): run `make clean-demo` "
                             "and then `make demo`, or pass --out to another folder")
        self.root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(record, inputs)

    def stage_data(self) -> dict:
        from star.data.builtin import write_demo_image_folder

        spec = write_demo_image_folder(self.data, self.config.subset, self.config.train_per_class,
                                       self.config.val_per_class)
        self.class_names = spec["class_names"]
        print(f"{len(self.class_names)} classes ({', '.join(self.class_names)}): {spec['train']['images']} training "
              f"and {spec['val']['images']} held-out images, {spec['train']['size']} px, in {self.data}/")
        return spec

    def stage_tokenize(self) -> None:
        from star.data.extract import TokenizeConfig, format_summary, run_tokenize

        for split, views in (("train", "tencrop"), ("val", "center")):
            out = self.root / "shards" / split
            if (out / "manifest.json").is_file():
                print(f"done: {out}")
                continue
            summary = run_tokenize(TokenizeConfig(
                data=str(self.data / split), out=str(out), vq_ckpt=self.config.vq_ckpt,
                vq_config=self.config.vq_config, image_size=IMAGE_SIZE, view_policy=views, shard_size=1000,
                batch_size=64, num_workers=1, precision=self.precision))
            print(format_summary(summary))

    # -- training ----------------------------------------------------------------------------------------------

    def model_json(self) -> Path:
        from star.data.manifest import Manifest

        manifest = Manifest.load(self.root / "shards" / "train")
        path = self.root / "gpt_config.json"
        write_json_atomic(path, {**self.gpt_config, "num_classes": manifest.num_classes,
                                 "vocab_size": manifest.codebook_size})
        return path

    def runs(self) -> dict[str, tuple[Path, bool]]:
        """label -> (run folder, ST-AR on)."""
        config = self.config
        seed = f"_seed{config.seed}" if config.seed else ""
        star_label = "ST-AR" if config.view_match == "index" else f"ST-AR ({config.view_match})"
        star_name = "gpt_star" + ("" if config.view_match == "index" else f"_{config.view_match}") + seed
        runs = {star_label: (self.root / star_name, True)}
        if config.baseline:
            runs = {"LlamaGen (baseline)": (self.root / f"gpt_baseline{seed}", False), **runs}
        return runs

    def train_config(self, run: Path, self_guided: bool, progress: bool = True):
        from star.train.loop import TrainConfig

        config = self.config
        return TrainConfig(shards=str(self.root / "shards" / "train"), out=str(run), model=str(self.model_json()),
                           steps=config.steps, batch_size=config.batch_size, lr=config.lr, num_workers=0,
                           log_every=25, ckpt_every=max(50, config.steps // 4), keep_checkpoints=1,
                           self_guided=self_guided, resume="auto", projector_hidden=256, view_match=config.view_match,
                           seed=config.seed, precision=self.precision, progress=progress)

    def is_trained(self, run: Path) -> bool:
        log = run / "log.jsonl"
        return log.is_file() and any(json.loads(line)["step"] >= self.config.steps
                                     for line in log.read_text().splitlines() if line.strip())

    def prepare_token_cache(self) -> None:
        """Built once here, so that the two runs training side by side find it ready."""
        from dataclasses import replace

        from star.train.loop import prepare_token_cache

        prepare_token_cache(replace(self.train_config(self.root / "unused", True), prepare_only=True))

    def start_training_beside(self, run: Path, self_guided: bool):
        """Train `run` in a process of its own on one core while this process goes on (None if trained)."""
        import multiprocessing

        if self.is_trained(run):
            print(f"done: {run}")
            return None
        process = multiprocessing.get_context("spawn").Process(
            target=train_on_one_core, args=(self.train_config(run, self_guided, progress=False),),
            name=f"train {run.name}")
        process.start()
        print(f"training {run.name} in process {process.pid} beside this one (log: {run / 'log.jsonl'})", flush=True)
        return process

    def stage_train(self, run: Path, self_guided: bool) -> None:
        from star.train.loop import train

        if self.is_trained(run):
            print(f"done: {run}")
            return
        train(self.train_config(run, self_guided))

    def stage_probe(self, run: Path) -> list[dict]:
        """Linear-probe accuracy per step of the middle layer (the paper's Fig. 1b): held-out centre crops, trained
        on the training images' unflipped centre crops (ten-crop view 4); cached in the run folder."""
        from star.data.manifest import shard_tokens
        from star.eval.generator import load_generator
        from star.eval.understanding import probe

        out = run / "probe.json"
        if out.is_file():
            return json.loads(out.read_text())
        train_x, train_y = shard_tokens(self.root / "shards" / "train", view=4)
        test_x, test_y = shard_tokens(self.root / "shards" / "val", view=0)
        layer = self.gpt_config["n_layer"] // 2
        rows = probe(load_generator(str(run)), train_x, train_y, test_x, test_y, layer, PROBE_STEPS)
        write_json_atomic(out, rows)
        return rows

    # -- scoring -----------------------------------------------------------------------------------------------

    def scorer(self) -> "Scorer":
        """Made once (the Inception network, the held-out images' features), when the first row is scored."""
        if self._scorer is None:
            self._scorer = self.timed("inception: held-out", Scorer, self.data / "val", self.root / "fid_cache",
                                      self.precision)
        return self._scorer

    def ceiling_row(self) -> dict:
        return {"metrics": self.timed("score ceiling", self.scorer().score, self.timed("decode ceiling",
                                                                                        self.stage_ceiling))}

    def evaluate(self, run: Path) -> dict:
        """Sample, score and probe one trained run: its row of the table."""
        samples = self.timed(f"sample {run.name}", self.stage_sample, run)
        row = {"metrics": self.timed(f"score {run.name}", self.scorer().score, samples / "samples.npz"),
               "grid": samples / "grid.png", "run": run}
        if self.config.probe:
            row["probe"] = self.timed(f"probe {run.name}", self.stage_probe, run)
        return row

    def stage_sample(self, run: Path) -> Path:
        from star.eval.sample import SampleConfig, run_sampling
        from star.gpt.generate import SamplingSettings

        out = self.root / "samples" / run.name
        if (out / "samples.npz").is_file() and (out / "grid.png").is_file():
            print(f"done: {out}")
            return out
        run_sampling(SampleConfig(ckpt=str(run), out=str(out), vq_ckpt=self.config.vq_ckpt,
                                  vq_config=self.config.vq_config,
                                  sampling=SamplingSettings(cfg_scale=self.config.cfg_scale),
                                  num_samples=self.config.samples_per_class * len(self.class_names), batch_size=100,
                                  seed=self.config.seed, progress=False, class_names=list(self.class_names),
                                  grid_per_class=0))
        return out

    def stage_ceiling(self) -> Path:
        """The held-out images' tokens decoded by the VQ, as many (class-balanced) as one model's samples: what a
        perfect generator over these tokens would score."""
        from star.data.manifest import shard_tokens
        from star.eval.sample import tokens_to_uint8
        from star.study.pipeline import balanced_subset
        from star.vq.model import VQConfig, load_vq

        npz = self.root / "ceiling" / "samples.npz"
        if npz.is_file():
            return npz
        tokens, labels = shard_tokens(self.root / "shards" / "val", view=0)  # [N, 64], [N]
        keep = balanced_subset(labels, self.config.samples_per_class * len(self.class_names))
        vq = load_vq(self.config.vq_ckpt, VQConfig.resolve(self.config.vq_config))
        images = tokens_to_uint8(vq, torch.from_numpy(tokens[keep]), int(tokens.shape[1] ** 0.5))  # [n, 32, 32, 3]
        npz.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(npz) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, arr_0=images, labels=labels[keep])
        return npz


class Scorer:
    """One Inception network and the held-out images' features, shared by every row of the metrics table."""

    def __init__(self, reference: Path, cache_dir: Path, precision: str):
        from star.eval.inception import InceptionFeatures, find_inception_weights
        from star.eval.reference import FeatureOptions, load_reference

        self.model = InceptionFeatures(find_inception_weights(None), precision)
        self.reference = load_reference(reference, model=self.model, options=FeatureOptions(cache_dir=cache_dir))

    def score(self, samples: Path) -> dict:
        """FID, KID, precision and recall of a samples .npz against the held-out images; cached beside it."""
        from star.eval.inception import extract_features
        from star.eval.reference import image_source

        out = samples.parent / "metrics.json"
        if out.is_file() and out.stat().st_mtime >= samples.stat().st_mtime:
            return json.loads(out.read_text())
        features = extract_features(image_source(samples), model=self.model, progress=False).features  # [N, 2048]
        metrics = {**self.compare(features, self.reference.features), "inception_precision": self.model.precision}
        write_json_atomic(out, metrics)
        return metrics

    @staticmethod
    def compare(features: np.ndarray, reference: np.ndarray) -> dict:
        from star.eval.scores import frechet_distance_from_features, kernel_inception_distance, precision_recall

        precision, recall = precision_recall(reference, features, k=3)
        kid, kid_std, _, _ = kernel_inception_distance(reference, features)
        return {"fid": frechet_distance_from_features(reference, features), "kid": kid, "kid_std": kid_std,
                "precision": precision, "recall": recall,
                "num_samples": len(features), "num_reference": len(reference)}

    def control(self) -> dict:
        """Real against real: the held-out features split in two halves (no new images), the row the others are
        read against (FID is biased upwards at small N; KID is not)."""
        features = self.reference.features
        return self.compare(features[0::2], features[1::2])  # listed class by class: both halves are balanced


def main(argv=None) -> int:
    config = parse_config(DemoConfig, argv, description=__doc__)
    try:
        return run_demo(config)
    except KeyboardInterrupt:
        print(f"\ninterrupted: run {RERUN} again to continue where it stopped (finished stages are kept)",
              file=sys.stderr)
        return 130


def run_demo(config: DemoConfig) -> int:
    started = time.time()
    demo = Demo(config)
    demo.check_inputs()
    banner("1/3 data: the Fashion-MNIST subset committed in star/demo_data/")
    demo.timed("data", demo.stage_data)
    banner(f"2/3 tokenize with the committed VQ ({config.vq_ckpt}): ten crops per training image, the centre crop "
           "per held-out image")
    demo.timed("tokenize", demo.stage_tokenize)
    banner(f"3/3 train the {GPT_SIZES[config.gpt]['n_layer']}-layer GPTs ({', '.join(demo.runs())}), then sample "
           f"{config.samples_per_class} per class with CFG {config.cfg_scale} and score each, and the tokenizer's ceiling")
    scored = demo.timed("train and score", train_and_score, demo)
    rows = {label: scored[label] for label in [*demo.runs(), CEILING]}  # the table's order
    rows["real vs real (control)"] = {"metrics": demo.scorer().control()}
    if config.probe:
        from star.plots import plot_probe_curves

        curves = {label: row["probe"] for label, row in rows.items() if row.get("probe")}
        plot_probe_curves(curves, demo.root / "probe.png", chance=1 / len(demo.class_names))
    summary = render_summary(demo, rows, time.time() - started)
    with atomic_path(demo.root / "summary.md") as tmp:
        Path(tmp).write_text(summary + "\n")
    print("\n" + summary)
    return 0


def train_and_score(demo: Demo) -> dict:
    """ST-AR (the longer run) trains in a process of its own while this one trains, samples and scores the
    baseline and scores the tokenizer's ceiling: the two cores work side by side. Returns rows by label."""
    runs = demo.runs()
    star_label = next(label for label, (_, self_guided) in runs.items() if self_guided)
    star_run = runs[star_label][0]
    others = {label: run for label, (run, self_guided) in runs.items() if not self_guided}
    if not others:
        demo.timed(f"train {star_run.name}", demo.stage_train, star_run, True)
        return {star_label: demo.evaluate(star_run), CEILING: demo.ceiling_row()}
    demo.prepare_token_cache()
    beside = demo.start_training_beside(star_run, True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = {}
    try:
        for label, run in others.items():
            demo.timed(f"train {run.name}", demo.stage_train, run, False)
            rows[label] = demo.evaluate(run)
        rows[CEILING] = demo.ceiling_row()
        demo.timed(f"wait for {star_run.name}", wait_for, beside)
    finally:
        stop(beside)
        torch.set_num_threads(threads)
    rows[star_label] = demo.evaluate(star_run)
    return rows


def wait_for(process) -> None:
    if process is None:
        return
    process.join()
    if process.exitcode != 0:
        raise RuntimeError(f"{process.name} failed (exit code {process.exitcode}; its error is printed above); run "
                           f"{RERUN} again to resume it")


def stop(process) -> None:
    """After an interrupt: the training process got the same Ctrl-C and saves its checkpoint; wait a little."""
    if process is None or not process.is_alive():
        return
    process.join(timeout=60)
    if process.is_alive():
        process.terminate()
        process.join()


def resolve_demo_precision(requested: str) -> str:
    """auto: bf16 on a CPU with AMX, fp32 elsewhere: the demo also trains its GPTs in this precision, and only
    AMX is measured to speed those up (the study's Inception-only rule also takes AVX512-BF16)."""
    from star.study.__main__ import AMX_BF16, resolve_fid_precision

    return resolve_fid_precision(requested, AMX_BF16)


def train_on_one_core(train_config) -> None:
    """The body of a training process started by Demo.start_training_beside."""
    torch.set_num_threads(1)
    from star.train.loop import train

    train(train_config)


def final_loss_ar(run: Path) -> float:
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    return float(records[-1]["loss_ar"])


def render_summary(demo: Demo, rows: dict, seconds: float) -> str:
    config = demo.config
    control = rows["real vs real (control)"]["metrics"]
    lines = ["# ST-AR demo: summary", "",
             f"Fashion-MNIST subset ({config.subset}) written to {demo.data}/; classes, one grid row each in this "
             f"order: {', '.join(demo.class_names)}.",
             f"GPT {config.gpt} ({demo.gpt_config['dim']} wide, {demo.gpt_config['n_layer']} layers), {config.steps} "
             f"steps of {config.batch_size} images, lr {config.lr}; samples with CFG {config.cfg_scale}.", "",
             "| model | FID | KID x 1000 (± sd over subsets) | precision | recall | probe acc., last position | final L_AR |",
             "|---|---|---|---|---|---|---|"]
    for label, row in rows.items():
        m = row["metrics"]
        probe = f"{row['probe'][-1]['accuracy']:.3f}" if row.get("probe") else "-"
        loss = f"{final_loss_ar(row['run']):.3f}" if row.get("run") else "-"
        kid = f"{1000 * m['kid']:.1f} ± {1000 * m.get('kid_std', 0.0):.1f}"
        lines.append(f"| {label} | {m['fid']:.1f} | {kid} | {m['precision']:.3f} | {m['recall']:.3f} "
                     f"| {probe} | {loss} |")
    first = next(iter(rows.values()))["metrics"]
    lines += ["", f"Each generated row and the ceiling: {first['num_samples']} images against the "
                  f"{first['num_reference']} held-out images; the control: {control['num_samples']} held-out images "
                  f"against the other {control['num_reference']}. FID is biased upwards at this size (read each row "
                  "against the control's); KID is not. Precision / recall: k=3 nearest-neighbour manifolds.", ""]
    for label, row in rows.items():
        if row.get("probe"):
            lines.append(f"- probe accuracy by sequence position, {label} (chance {1 / len(demo.class_names):.2f}): "
                         + ", ".join(f"{r['step']}: {r['accuracy']:.2f}" for r in row["probe"]))
    for label, row in rows.items():
        if row.get("grid"):
            lines.append(f"- samples of {label}: {row['grid']} (run {row['run']})")
    if config.probe:
        lines.append(f"- probe accuracy by sequence position, both models: {demo.root / 'probe.png'}")
    lines.append(f"- time: {seconds:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in demo.timings.items()) + ")")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
