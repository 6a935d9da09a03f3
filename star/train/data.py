"""Moved: the stage-two loader is star/train/token_loader.py ("data" means stage one). Kept for old imports."""
from star.train.token_loader import (  # noqa: F401
    EpochBatchSampler,
    TokenBatch,
    TokenViews,
    build_token_cache,
    collate_views,
    geometric_match,
    select_views,
    stream_loader,
)
