"""Decoding with the MTP heads: a KV-cached forward (decoder.py) and greedy / self-speculative decoding."""
