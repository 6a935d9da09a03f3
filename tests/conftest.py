from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "llamagen"  # outputs of LlamaGen's own code (see its README)

# One intra-op thread: tiny tensors gain nothing from two, and two threads stall badly whenever another
# process (a DataLoader worker, a 2-process launch) holds the second core.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    assert FIXTURES.is_dir(), f"LlamaGen fixtures not found at {FIXTURES}"
    return FIXTURES


@pytest.fixture(scope="session")
def small_vq(fixtures_dir):
    """(checkpoint path, config path) of the small official-format VQ: downsample 4, codebook 256."""
    return fixtures_dir / "vq_small.pt", fixtures_dir / "vq_small.json"


TINY_GPT = {"dim": 64, "n_layer": 2, "n_head": 4, "vocab_size": 256, "num_classes": 3, "block_size": 64,
            "multiple_of": 32}


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory, small_vq):
    """Ten-crop token shards of 24 built-in photo crops (3 classes) through the small VQ: 32 px -> 8x8 tokens."""
    from star.data.builtin import build_builtin_dataset
    from star.data.extract import TokenizeConfig, run_tokenize

    root = tmp_path_factory.mktemp("tiny")
    build_builtin_dataset(root / "data", train_per_class=8, val_per_class=2, image_size=40,
                          classes=("astronaut", "coffee", "rocket"))
    run_tokenize(TokenizeConfig(data=str(root / "data" / "train"), out=str(root / "shards"), vq_ckpt=str(small_vq[0]),
                                vq_config=str(small_vq[1]), image_size=32, shard_size=10, num_workers=0, progress=False))
    return root / "shards"


@pytest.fixture()
def tiny_gpt_json(tmp_path):
    import json

    path = tmp_path / "tiny_gpt.json"
    path.write_text(json.dumps(TINY_GPT))
    return path


# The launch that really starts 2 CPU processes (`--cpu --num_processes 2` silently starts one).
TWO_CPU_PROCESSES = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                     "--mixed_precision", "no", "--dynamo_backend", "no"]
CPU_ENV = {"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
