"""The reference SD3 trainer: an MMDiT trained with rectified flow on curate's training shards."""
