"""Sampling and the jit-compiled generation loop shared by every family."""
