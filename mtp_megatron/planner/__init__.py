"""Memory and throughput planning for a config on a cluster, before any GPU is allocated (see tools/plan.py)."""
