"""The paper's "understanding" measurements: linear probes of a layer's features per step (Fig. 1b) and
attention maps with their mass on the class position and on the 8 spatial neighbours (Fig. 1a / 2).

Position t (1-based, the `--positions` flag; "step" in the paper's figures and in the JSON rows) is sequence
index t - 1: index 0 is the class, index s holds image token s - 1 as its input. The class input is replaced by
the null class for probing, so no label leaks into the features.

`run_probe` / `run_attention` are what `evaluate/run.py probe|attention` call, with the same settings objects.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from star.data.manifest import shard_tokens
from star.downloads import DOWNLOAD_DIR_HELP, fetch_file
from star.eval.generator import WEIGHT_CHOICES, load_generator, resolve_checkpoint
from star.eval.sample import CHECKPOINT_FLAGS, parse_int_list
from star.gpt.model import GPT
from star.io import write_json_atomic
from star.plots import plot_attention_maps, plot_probe_curves
from star.runtime import pick_device
from star.settings import DEVICE_CHOICES, check, check_device, setting


@torch.inference_mode()
def layer_features(model: GPT, tokens: np.ndarray, layer: int, positions: list[int], batch_size: int = 64) -> np.ndarray:
    """Hidden states after `layer` blocks at each position (1-based), null class as input: [len(positions), N, D]."""
    model.eval()
    device = model.tok_embeddings.weight.device
    indices = torch.tensor([p - 1 for p in positions], device=device)
    chunks = []
    for start in range(0, len(tokens), batch_size):
        batch = torch.from_numpy(tokens[start : start + batch_size]).to(device)
        null = torch.full((len(batch),), model.config.null_class, device=device)
        hidden = model(batch[:, :-1], null, return_layers=(layer,)).hidden[layer]  # [b, S, D]
        chunks.append(hidden[:, indices].float().cpu())
    return torch.cat(chunks).permute(1, 0, 2).numpy()


def linear_probe_accuracy(train_x, train_y, test_x, test_y, epochs: int = 300, lr: float = 0.05, seed: int = 0,
                          device="cpu") -> float:
    """Standardised features (BatchNorm without affine, as MAE's probe) -> a linear classifier, full-batch Adam,
    fitted on `device` (the model's: a GPU fits ImageNet-sized feature sets in seconds)."""
    generator = torch.Generator().manual_seed(seed)
    train_x = torch.as_tensor(train_x, dtype=torch.float32).to(device)
    test_x = torch.as_tensor(test_x, dtype=torch.float32).to(device)
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    train_y, test_y = torch.as_tensor(train_y).to(device), torch.as_tensor(test_y).to(device)
    classes = int(max(train_y.max(), test_y.max())) + 1
    classifier = torch.nn.Linear(train_x.shape[1], classes)
    torch.nn.init.normal_(classifier.weight, std=0.01, generator=generator)
    torch.nn.init.zeros_(classifier.bias)
    classifier = classifier.to(device)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=lr, weight_decay=1e-4)
    for _ in range(epochs):
        optimizer.zero_grad()
        F.cross_entropy(classifier(train_x), train_y).backward()
        optimizer.step()
    with torch.no_grad():
        return float((classifier(test_x).argmax(1) == test_y).float().mean())


def probe(model: GPT, train_tokens, train_labels, test_tokens, test_labels, layer: int,
          positions: list[int]) -> list[dict]:
    """Linear-probe accuracy per position: rows {"step": position, "accuracy": ...} (the paper's Fig. 1b)."""
    train_features = layer_features(model, train_tokens, layer, positions)
    test_features = layer_features(model, test_tokens, layer, positions)
    device = model.tok_embeddings.weight.device
    return [{"step": position, "accuracy": linear_probe_accuracy(train_features[i], train_labels, test_features[i],
                                                                 test_labels, device=device)}
            for i, position in enumerate(positions)]


@torch.inference_mode()
def attention_maps(model: GPT, tokens: np.ndarray, labels: np.ndarray, layers: list[int]) -> dict[int, torch.Tensor]:
    """Softmax attention probabilities averaged over heads and samples, per layer (1-based): [S, S]."""
    model.eval()
    device = model.tok_embeddings.weight.device
    batch = torch.from_numpy(tokens).to(device)
    captured: dict[int, torch.Tensor] = {}
    handles = []
    for layer_index in layers:
        attention = model.layers[layer_index - 1].attention

        def hook(module, inputs, _output, layer_index=layer_index):
            x, rotary = inputs[0], inputs[1]
            q, k, _ = module._project(x, rotary)  # [B, H, S, hd]
            if module.n_kv_head != module.n_head:
                k = k.repeat_interleave(module.n_head // module.n_kv_head, dim=1)
            scores = (q.float() @ k.float().transpose(-1, -2)) / q.shape[-1] ** 0.5
            seq = scores.shape[-1]
            future = torch.ones(seq, seq, dtype=torch.bool, device=scores.device).triu(1)
            captured[layer_index] = scores.masked_fill(future, float("-inf")).softmax(-1).mean((0, 1))

        handles.append(attention.register_forward_hook(hook))
    try:
        model(batch[:, :-1], torch.from_numpy(labels).to(device))
    finally:
        for handle in handles:
            handle.remove()
    return captured


def attention_statistics(weights: torch.Tensor, grid: int) -> dict:
    """Mean attention mass (over image queries) on the class position and on the 8 grid neighbours of each
    query's own cell (only earlier cells are visible, so at most 4 of the 8 carry mass)."""
    seq = weights.shape[0]
    class_mass = float(weights[1:, 0].mean())
    neighbour_mass = []
    for query in range(1, seq):
        row, column = divmod(query - 1, grid)  # the query's own input cell
        keys = []
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                r, c = row + dy, column + dx
                if (dy or dx) and 0 <= r < grid and 0 <= c < grid:
                    key = r * grid + c + 1
                    if key <= query:
                        keys.append(key)
        neighbour_mass.append(float(weights[query, keys].sum()) if keys else 0.0)
    return {"class_mass": class_mass, "neighbour_mass": float(np.mean(neighbour_mass))}


def attention_panels(weights: dict[int, torch.Tensor], positions: list[int], grid: int
                     ) -> tuple[dict[int, dict[int, np.ndarray]], dict[int, dict[int, float]]]:
    """Per layer and query position: its attention over the image grid [grid, grid] (NaN where the causal mask
    hides a cell) and its attention on the class position."""
    maps: dict[int, dict[int, np.ndarray]] = {}
    class_mass: dict[int, dict[int, float]] = {}
    for layer in sorted(weights):
        maps[layer], class_mass[layer] = {}, {}
        for position in positions:
            query = position - 1  # sequence index
            cells = np.full(grid * grid, np.nan)
            cells[:query] = weights[layer][query, 1 : query + 1].float().cpu().numpy()  # keys 1..query: cells 0..
            maps[layer][position] = cells.reshape(grid, grid)
            class_mass[layer][position] = float(weights[layer][query, 0])
    return maps, class_mass


def save_attention_png(weights: dict[int, torch.Tensor], positions: list[int], grid: int, path: Path) -> Path:
    """Rows = layers, columns = query positions; each panel the query's attention over the image grid with axes,
    a shared colour bar, and its class mass (star/plots.py `plot_attention_maps`)."""
    return plot_attention_maps(*attention_panels(weights, positions, grid), path)


# ----------------------------------------------------------------------------------------------------------
# The commands' settings and entry points


def even_positions(block_size: int, count: int) -> list[int]:
    return [round(block_size * (i + 1) / count) for i in range(count)]


@dataclass
class AnalysisModel:
    """Which generator to look inside (shared by probe and attention)."""

    ckpt: str = setting(help="run folder, checkpoint folder, .safetensors, or LlamaGen .pt (a path, an official "
                             "name such as c2i_B_256.pt, or a URL)")
    model: str = setting("", help="preset or JSON (needed for official LlamaGen checkpoints)")
    weights: str = setting("student", choices=WEIGHT_CHOICES, help="student, or the EMA teacher of an ST-AR run")
    device: str = setting("auto", help=f"{', '.join(DEVICE_CHOICES)} or cuda:N")
    download_dir: str = setting("", help=DOWNLOAD_DIR_HELP)
    allow_other_tokenizer: bool = setting(False, help="score shards tokenized by a VQ other than the one the run "
                                                      "was trained with (warn instead of refusing)")

    def __post_init__(self) -> None:
        check(bool(self.ckpt), "--ckpt is required")
        check(self.weights in WEIGHT_CHOICES, f"--weights {self.weights!r}: choose one of {', '.join(WEIGHT_CHOICES)}")
        check_device(self.device)

    def load(self) -> GPT:
        ckpt = fetch_file(self.ckpt, "--ckpt", self.download_dir)
        return load_generator(ckpt, self.model, self.weights, CHECKPOINT_FLAGS).to(pick_device(self.device)).eval()

    def check_shards(self, *shards: str) -> None:
        """Refuse shards of another tokenizer than the run recorded (see star/eval/tokenizer.py)."""
        from star.eval.tokenizer import check_shards_tokenizer

        checkpoint_file = resolve_checkpoint(fetch_file(self.ckpt, "--ckpt", self.download_dir), self.weights,
                                             CHECKPOINT_FLAGS)
        for folder in shards:
            check_shards_tokenizer(folder, checkpoint_file, self.allow_other_tokenizer)


def check_positions(positions: list[int], block_size: int, flag: str = "--positions") -> None:
    bad = [p for p in positions if not 1 <= p <= block_size]
    check(not bad, f"{flag} {bad}: positions are 1..{block_size} (the model's grid has {block_size} tokens)")


@dataclass
class ProbeConfig:
    """Settings of `evaluate/run.py probe`: linear-probe accuracy per sequence position (paper Fig. 1b)."""

    generator: AnalysisModel
    shards: str = setting(help="training shards for the probe")
    eval_shards: str = setting(help="held-out shards")
    out: str = setting(help="output folder: probe.json, probe.png")
    layer: int = setting(0, help="residual stream after this many blocks (0: the middle layer)")
    positions: str = setting("", help="comma list of sequence positions, 1..block_size (empty: 8 evenly spaced)")
    view: int = setting(0, help="which stored view of each image")
    limit: int = setting(50_000, help="at most this many samples per split, class-balanced and drawn at random "
                                      "(0 = all; ImageNet's 1.28M would hold ~31 GB of features)")

    def __post_init__(self) -> None:
        check(self.layer >= 0, f"--layer {self.layer}: must be >= 0 (0 = the middle layer)")
        check(self.view >= 0, f"--view {self.view}: must be >= 0")
        check(self.limit >= 0, f"--limit {self.limit}: must be >= 0 (0 = all samples)")
        check(all(p > 0 for p in parse_int_list(self.positions, "--positions")),
              f"--positions {self.positions}: positions start at 1")

    def resolve(self, model: GPT) -> tuple[int, list[int]]:
        """(layer, positions) for this model, checked against its depth and grid."""
        n_layer, block = model.config.n_layer, model.config.block_size
        check(self.layer <= n_layer, f"--layer {self.layer}: the model has {n_layer} layers")
        positions = parse_int_list(self.positions, "--positions") or even_positions(block, 8)
        check_positions(positions, block)
        return self.layer or n_layer // 2, positions


def _same_classes(shards: str, eval_shards: str) -> None:
    """A probe fitted on one labelling cannot be scored on another: both splits must name the same classes."""
    from star.data.manifest import Manifest

    train, held_out = Manifest.load(shards).classes, Manifest.load(eval_shards).classes
    if train != held_out:
        only = sorted(set(train.items()) ^ set(held_out.items()))[:3]
        raise ValueError(f"--eval-shards {eval_shards} has other classes than --shards {shards} ({len(held_out)} vs "
                         f"{len(train)}; e.g. {only}): tokenize both splits from folders with the same class names")


def _class_count_check(labels: np.ndarray, shards: str, limit: int) -> None:
    classes = len(set(labels.tolist()))
    if classes < 2:
        hint = f"--limit {limit} leaves" if limit else f"{shards} holds"
        raise ValueError(f"{hint} {len(labels)} samples of {classes} class: a probe needs at least 2 classes "
                         "(raise --limit, or use shards with more classes)")


def run_probe(config: ProbeConfig) -> dict:
    """Train a linear probe per position on `shards`, score it on `eval_shards`; write probe.json + probe.png."""
    _same_classes(config.shards, config.eval_shards)
    config.generator.check_shards(config.shards, config.eval_shards)
    model = config.generator.load()
    layer, positions = config.resolve(model)
    train_x, train_y = shard_tokens(config.shards, config.view, config.limit)
    _class_count_check(train_y, config.shards, config.limit)
    test_x, test_y = shard_tokens(config.eval_shards, config.view, config.limit)
    rows = probe(model, train_x, train_y, test_x, test_y, layer, positions)
    out = Path(config.out)
    result = {"layer": layer, "rows": rows, "train_samples": len(train_y), "eval_samples": len(test_y),
              "chance": 1.0 / len(set(train_y.tolist()))}
    write_json_atomic(out / "probe.json", result)
    plot_probe_curves({f"layer {layer}": rows}, out / "probe.png", chance=result["chance"])
    result["written"] = [str(out / "probe.json"), str(out / "probe.png")]
    return result


def format_probe(result: dict) -> str:
    lines = [f"linear probe, layer {result['layer']} ({result['train_samples']} train / {result['eval_samples']} "
             f"held-out, chance {result['chance']:.3f})", "  position  accuracy"]
    lines += [f"  {row['step']:>8}  {row['accuracy']:.3f}" for row in result["rows"]]
    lines.append(f"written: {', '.join(result['written'])}")
    return "\n".join(lines)


@dataclass
class AttentionConfig:
    """Settings of `evaluate/run.py attention`: maps and class / neighbour attention mass per layer."""

    generator: AnalysisModel
    shards: str = setting(help="token shards to run the model on")
    out: str = setting(help="output folder: attention.png, attention.json")
    layers: str = setting("", help="comma list of layers, 1..n_layer (empty: first, middle, last)")
    positions: str = setting("", help="comma list of query positions, 1..block_size (empty: 4 evenly spaced)")
    samples: int = setting(32, help="images averaged over")

    def __post_init__(self) -> None:
        check(self.samples > 0, f"--samples {self.samples}: must be > 0")
        check(all(p > 0 for p in parse_int_list(self.positions, "--positions")),
              f"--positions {self.positions}: positions start at 1")
        check(all(layer > 0 for layer in parse_int_list(self.layers, "--layers")),
              f"--layers {self.layers}: layers are numbered from 1")

    def resolve(self, model: GPT) -> tuple[list[int], list[int]]:
        n_layer, block = model.config.n_layer, model.config.block_size
        layers = parse_int_list(self.layers, "--layers") or sorted({1, max(1, n_layer // 2), n_layer})
        bad = [layer for layer in layers if not 1 <= layer <= n_layer]
        check(not bad, f"--layers {bad}: the model's layers are 1..{n_layer}")
        positions = parse_int_list(self.positions, "--positions") or even_positions(block, 4)
        check_positions(positions, block)
        return layers, positions


def run_attention(config: AttentionConfig) -> dict:
    """Average attention maps of `samples` images; write attention.png + attention.json."""
    config.generator.check_shards(config.shards)
    model = config.generator.load()
    layers, positions = config.resolve(model)
    tokens, labels = shard_tokens(config.shards, 0, config.samples)
    weights = attention_maps(model, tokens, labels, layers)
    grid = model.config.grid_size
    stats = {layer: attention_statistics(weights[layer], grid) for layer in layers}
    out = Path(config.out)
    png = save_attention_png(weights, positions, grid, out / "attention.png")
    write_json_atomic(out / "attention.json", {"layers": {str(k): v for k, v in stats.items()}, "positions": positions})
    return {"layers": stats, "positions": positions, "written": [str(png), str(out / "attention.json")]}


def format_attention(result: dict) -> str:
    lines = ["layer  mass on class  mass on 8 neighbours"]
    lines += [f"{layer:>5}  {row['class_mass']:>13.3f}  {row['neighbour_mass']:>20.3f}"
              for layer, row in result["layers"].items()]
    lines.append(f"written: {', '.join(result['written'])}")
    return "\n".join(lines)
