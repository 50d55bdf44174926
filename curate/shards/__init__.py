"""Read `encode` training shards: bucketed batches for PyTorch, and SD3's conditioning rebuilt exactly.

    from curate.shards import ShardDataset, ShardLoader, sd3_conditioning
    loader = ShardLoader(ShardDataset("RUN/encode", batch_size=8, seed=0), num_workers=2)
    for batch in loader:                      # every batch holds one bucket
        latents = batch["latent"]             # [B, 16, H/8, W/8] float16 (or bfloat16)
        prompt_embeds, pooled = sd3_conditioning(batch)   # [B, 154, 4096], [B, 2048]
        state = loader.state_dict()           # save with the checkpoint; load_state_dict() resumes

The plan of an epoch (which rows form which batch, in which order, on which rank and DataLoader
worker) is computed from Parquet metadata alone, from the seed and the epoch, so any worker can tell
where a resumed run stands without reading data. docs/training-shards.md has the details.
"""

from curate.shards.index import (
    ENCODE_TENSORS,
    RowGroup,
    ShardInfo,
    dataloader_skips,
    index_shards,
    plan_slot,
    shard_files,
)
from curate.shards.reader import ShardDataset, ShardLoader, sd3_conditioning, sd3_latents

__all__ = [
    "ENCODE_TENSORS",
    "RowGroup",
    "ShardDataset",
    "ShardInfo",
    "ShardLoader",
    "dataloader_skips",
    "index_shards",
    "plan_slot",
    "sd3_conditioning",
    "sd3_latents",
    "shard_files",
]
