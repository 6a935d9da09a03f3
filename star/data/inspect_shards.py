"""`tokenize/inspect_shards.py DIR`: summarise a shard folder, validate every shard, optionally decode a few views."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from star.data.manifest import Manifest
from star.downloads import DOWNLOAD_DIR_HELP, fetch_file
from star.io import check_output_file, is_star_png
from star.settings import check, setting


@dataclass
class InspectConfig:
    shards: str = setting(help="token-shard folder written by tokenize/run.py", cli=False)  # the positional DIR
    vq_ckpt: str | None = setting(None, help="VQ checkpoint (a path, vq_ds16_c2i.pt or a URL): decode the first "
                                             "samples' views into a PNG")
    vq_config: str | None = setting(None, help="VQ preset or JSON (default: the config recorded in the manifest)")
    preview: str | None = setting(None, help="PNG path for the decoded views (default: DIR/preview.png)")
    preview_samples: int = setting(4, help="samples (rows) in the preview")
    overwrite: bool = setting(False, help="let --preview replace a file that is not a preview this tool wrote")
    download_dir: str = setting("", help=DOWNLOAD_DIR_HELP)

    def __post_init__(self) -> None:
        check(self.preview_samples > 0, f"--preview-samples must be > 0, got {self.preview_samples}")


def validate_shards(folder: str | Path) -> dict:
    """Check every shard: readable, every sample as the manifest says (shape, dtype, token and class ranges, view
    records), and the sample count; one problem line per damaged shard."""
    manifest = Manifest.load(folder)
    problems, total = [], 0
    for entry, tar_path in zip(manifest.shards, manifest.shard_paths()):
        if not tar_path.is_file():
            problems.append(f"{tar_path}: missing")
            continue
        try:
            total += sum(1 for _ in manifest.iter_samples([entry]))
        except ValueError as error:
            problems.append(str(error))
    return {"shards": len(manifest.shards), "samples": total, "problems": problems}


def describe_manifest(manifest: Manifest) -> str:
    grid, views = manifest.grid, manifest.views
    lines = [
        f"tokenizer      : {manifest.tokenizer.get('config_source')} (sha256 {manifest.tokenizer_sha256[:12]}...)",
        f"image size     : {manifest.image_size} px -> grid {grid[0]}x{grid[1]}, codebook {manifest.codebook_size}",
        f"views          : {views.policy} ({views.num_views} per image, crop range {views.crop_range})",
        f"classes        : {manifest.num_classes}",
        f"samples        : {manifest.num_samples} in {len(manifest.shards)} shards",
        f"rejected inputs: {manifest.num_rejected}",
    ]
    for item in manifest.rejected[:10]:
        lines.append(f"   - {item.path}: {item.reason}")
    if manifest.num_rejected > 10:
        lines.append(f"   ... and {manifest.num_rejected - 10} more (see manifest.json)")
    return "\n".join(lines)


def decode_preview(folder: str | Path, vq_ckpt: str, vq_config: str | None, out_png: str | Path, samples: int = 4) -> Path:
    """Decode the first few samples' views into one PNG grid: a row per sample, a column per view."""
    import torch

    from star.images import save_tile_grid
    from star.vq.model import VQConfig, load_vq

    manifest = Manifest.load(folder)
    model = load_vq(vq_ckpt, VQConfig.resolve(vq_config or manifest.tokenizer["config"]))
    rows = [sample.tokens.astype(np.int64) for sample in itertools.islice(manifest.iter_samples(), samples)]
    if not rows:
        raise ValueError(f"{folder} holds no samples to preview")
    grids = torch.from_numpy(np.concatenate(rows))  # [samples * V, h, w]
    with torch.inference_mode():
        images = model.decode_indices(grids)  # [samples * V, 3, S, S]
    pixels = (images * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    num_views = manifest.num_views
    save_tile_grid([list(pixels[i : i + num_views]) for i in range(0, len(pixels), num_views)], out_png)
    return Path(out_png)


def inspect(config: InspectConfig) -> int:
    """Print the summary and the validation; write the preview when a VQ is given. 0 = healthy, 1 = problems."""
    manifest = Manifest.load(config.shards)
    print(describe_manifest(manifest))
    report = validate_shards(config.shards)
    print(f"validated      : {report['samples']} samples in {report['shards']} shards, {len(report['problems'])} problems")
    for problem in report["problems"][:20]:
        print(f"   ! {problem}")
    if config.vq_ckpt:
        target = check_output_file(config.preview or Path(config.shards) / "preview.png", "--preview", "PNG preview",
                                   is_star_png, inputs=(config.vq_ckpt,), overwrite=config.overwrite)
        vq_ckpt = fetch_file(config.vq_ckpt, "--vq-ckpt", config.download_dir)
        png = decode_preview(config.shards, vq_ckpt, config.vq_config, target, config.preview_samples)
        print(f"preview        : {png} (a row per sample, a column per view)")
    return 1 if report["problems"] else 0
