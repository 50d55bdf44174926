"""The encode stage's shards as the training loop's batch source: one bucket per batch, endless, resumable."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from curate.sd3 import TextEmbeddings, text_embeddings
from curate.train.loop import TrainBatch


def from_encoder_output(out: Any) -> TextEmbeddings:
    """Prompts just encoded by `curate.encode.models.encode_text`, as the trainer's embeddings (float32)."""
    pooled = out.pooled.float()
    return text_embeddings(
        {
            "clip_l": out.clip_l.float(),
            "clip_g": out.clip_g.float(),
            "pooled": pooled,
            "t5": None if out.t5 is None else out.t5.float(),
        }
    )


def to_train_batch(batch: dict[str, Any]) -> TrainBatch:
    synthetic = text_embeddings(batch, "_synthetic") if "clip_l_synthetic" in batch else None
    return TrainBatch(
        latent=batch["latent"],
        original=text_embeddings(batch),
        synthetic=synthetic,
        has_synthetic=batch.get("has_synthetic") if synthetic is not None else None,
    )


class ShardBatches:
    """Cycles over the shards epoch after epoch; its state is the reader's (epoch, position, seed)."""

    def __init__(
        self,
        source: str | list[str],
        batch_size: int,
        seed: int = 0,
        num_workers: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        from curate.shards import ShardDataset, ShardLoader

        self.dataset = ShardDataset(source, batch_size=batch_size, seed=seed, rank=rank, world_size=world_size)
        self.loader = ShardLoader(self.dataset, num_workers=num_workers)
        encode = self.dataset.info.encode
        self.scaling_factor = float(encode["scaling_factor"])
        self.shift_factor = float(encode["shift_factor"])
        self.joint_attention_dim = int(encode["joint_attention_dim"])
        self.pooled_dim = int(self.dataset.info.shapes["pooled"][0])
        self.latent_channels = int(encode["latent_channels"])

    def __iter__(self) -> Iterator[TrainBatch]:
        while True:
            fresh, served = self.loader.position == 0, 0  # a run resumed at an epoch's end starts with none left
            for batch in self.loader:
                served += 1
                yield to_train_batch(batch)
            if served == 0 and fresh:
                world = self.dataset.world_size
                if world > 1:
                    raise ValueError(
                        f"the training shards leave a rank of {world} without a batch: they hold "
                        f"{len(self.dataset.groups)} row groups, each rank reads whole ones, and every "
                        "rank trains on as many batches as the rank with the fewest"
                    )
                raise ValueError("the training shards hold no samples to train on")

    def state_dict(self) -> dict[str, Any]:
        return dict(self.loader.state_dict())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)
