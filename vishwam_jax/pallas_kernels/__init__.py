"""Pallas kernels (GPU Triton / TPU Mosaic) with XLA fallbacks; each module documents its own API."""
