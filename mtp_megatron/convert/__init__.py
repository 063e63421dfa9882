"""Checkpoint conversion: our distributed checkpoints, Hugging Face Llama folders (plus MTP heads), Meta's format."""
