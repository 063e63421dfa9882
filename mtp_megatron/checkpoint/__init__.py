"""Checkpoints through megatron-core's dist_checkpointing (torch_dist format, resharded on load)."""
