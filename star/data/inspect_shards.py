"""`tokenize/run.py --inspect DIR`: summarise a shard folder, validate every shard, optionally decode a few views."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from star.data.shards import Manifest, decode_sample, iter_shard


def validate_shards(folder: str | Path) -> dict:
    """Check every shard: readable, sample count as the manifest says, token grids of the right shape and range."""
    folder = Path(folder)
    manifest = Manifest.load(folder)
    expected_shape = (manifest.num_views, *manifest.grid)
    problems, total = [], 0
    for entry in manifest.data["shards"]:
        tar_path = folder / entry["file"]
        if not tar_path.is_file():
            problems.append(f"{tar_path}: missing")
            continue
        count = 0
        try:
            for members in iter_shard(tar_path):
                sample = decode_sample(members)
                count += 1
                if sample.tokens.shape != expected_shape:
                    problems.append(f"{tar_path}:{sample.key}: tokens shape {sample.tokens.shape}, expected {expected_shape}")
                elif sample.tokens.size and int(sample.tokens.max()) >= manifest.codebook_size:
                    problems.append(f"{tar_path}:{sample.key}: token id {int(sample.tokens.max())} >= codebook "
                                    f"{manifest.codebook_size}")
                if not 0 <= sample.class_id < manifest.num_classes:
                    problems.append(f"{tar_path}:{sample.key}: class {sample.class_id} outside 0..{manifest.num_classes - 1}")
                if len(sample.views) != manifest.num_views:
                    problems.append(f"{tar_path}:{sample.key}: {len(sample.views)} view records, expected {manifest.num_views}")
        except (ValueError, KeyError) as error:
            problems.append(str(error))
        if count != entry["samples"]:
            problems.append(f"{tar_path}: holds {count} samples, manifest says {entry['samples']}")
        total += count
    return {"shards": len(manifest.data["shards"]), "samples": total, "problems": problems}


def describe_manifest(manifest: Manifest) -> str:
    data = manifest.data
    lines = [
        f"tokenizer      : {data['tokenizer']['config_source']} (sha256 {manifest.tokenizer_sha256[:12]}...)",
        f"image size     : {data['image_size']} px -> grid {data['grid'][0]}x{data['grid'][1]}, codebook {data['codebook_size']}",
        f"views          : {data['views']['policy']} ({data['views']['num_views']} per image, crop range {data['views']['crop_range']})",
        f"classes        : {data['num_classes']}",
        f"samples        : {data['num_samples']} in {len(data['shards'])} shards",
        f"rejected inputs: {data['num_rejected']}",
    ]
    for item in data["rejected"][:10]:
        lines.append(f"   - {item['path']}: {item['reason']}")
    if data["num_rejected"] > 10:
        lines.append(f"   ... and {data['num_rejected'] - 10} more (see manifest.json)")
    return "\n".join(lines)


def decode_preview(folder: str | Path, vq_ckpt: str, vq_config: str | None, out_png: str | Path, samples: int = 4) -> Path:
    """Decode the first few samples' views into one PNG grid: a row per sample, a column per view."""
    import torch

    from star.images import save_tile_grid
    from star.vq.model import VQConfig, load_vq

    folder = Path(folder)
    manifest = Manifest.load(folder)
    config = VQConfig.resolve(vq_config or manifest.data["tokenizer"]["config"])
    model = load_vq(vq_ckpt, config)
    rows = []
    for shard in manifest.shard_paths(folder):
        for members in iter_shard(shard):
            rows.append(decode_sample(members).tokens.astype(np.int64))
            if len(rows) == samples:
                break
        if len(rows) == samples:
            break
    if not rows:
        raise ValueError(f"{folder} holds no samples to preview")
    grids = torch.from_numpy(np.concatenate(rows))  # [samples * V, h, w]
    with torch.inference_mode():
        images = model.decode_indices(grids)  # [samples * V, 3, S, S]
    pixels = (images * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    num_views = manifest.num_views
    save_tile_grid([list(pixels[i : i + num_views]) for i in range(0, len(pixels), num_views)], out_png)
    return out_png
