import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures" / "llamagen"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    assert FIXTURES.is_dir(), f"LlamaGen fixtures not found at {FIXTURES} (shared/ must sit beside the checkout)"
    return FIXTURES


@pytest.fixture(scope="session")
def small_vq(fixtures_dir):
    """(checkpoint path, config path) of the small official-format VQ: downsample 4, codebook 256."""
    return fixtures_dir / "vq_small.pt", fixtures_dir / "vq_small.json"
