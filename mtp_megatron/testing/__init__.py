"""Helpers for tests that run real multi-process jobs on CPU (gloo)."""
