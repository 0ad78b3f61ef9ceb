"""Helpers for parity tests against HuggingFace transformers (the oracle for Gemma and DeepSeek-V3)."""

from __future__ import annotations

import numpy as np


def randomize_all(model, seed: int = 0, std: float = 0.1) -> None:
    """Give every parameter and floating buffer random values. transformers initialises norms at
    identity and biases at zero, which would hide convention bugs (`w` vs `1 + w`, a dropped bias)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std + (0.5 if "norm" in name else 0.0))
        for name, b in model.named_buffers():
            if b.is_floating_point() and "inv_freq" not in name and "embed_scale" not in name:
                b.copy_(torch.randn(b.shape, generator=gen) * std)


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    import torch

    ids = torch.tensor([prompt])
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, min_new_tokens=max_new_tokens)
    return out[0, len(prompt) :].tolist()


def assert_logits_close(ours, theirs, rel: float = 1e-4) -> None:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    err = np.abs(ours - theirs).max()
    scale = np.abs(theirs).max()
    assert err <= rel * scale, f"max abs error {err:.3g} > {rel} x max |logit| {scale:.3g}"
