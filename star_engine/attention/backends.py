"""Which kernel serves local attention: set_backend (the --attn-backend flag) and
backend_for, which on "auto" takes the first fused kernel that runs on the device and
agrees with the exact path on a small problem (probed once per device)."""

from __future__ import annotations

import functools

import torch

from ..names import ATTENTION_BACKENDS, FUSED_ATTENTION_BACKENDS
from .kernels import agrees, exact_attention_lse, fused_attention_lse, has_flash_attn, probe_inputs
_backend = "auto"


def set_backend(name: str) -> None:
    """Chooses the attention backend of this process (one of ATTENTION_BACKENDS)."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {name!r}")
    if name == "flash-attn" and not has_flash_attn():
        raise ValueError("attention backend flash-attn: the flash-attn package is not installed")
    global _backend
    _backend = name


def backend_for(device: torch.device, dtype: torch.dtype) -> str:
    """The backend that serves tensors of this device and dtype: one of the fused kernels,
    or "torch" (PyTorch's attention, and the exact path where the log-sum-exp is needed)."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        if _backend not in ("auto", "torch"):
            raise ValueError(f"attention backend {_backend} needs float16 or bfloat16 tensors on a GPU")
        return "torch"
    if _backend != "auto":
        return _backend
    for name in FUSED_ATTENTION_BACKENDS:
        if _works(name, device):
            return name
    return "torch"


@functools.cache
def _works(kernel: str, device: torch.device) -> bool:
    if kernel == "flash-attn" and not has_flash_attn():
        return False
    q, k, v = probe_inputs(device)
    k, v = k[:, 20:], v[:, 20:]  # 76 keys for 64 queries: the mask aligned bottom-right
    try:
        o, lse = fused_attention_lse(kernel, q, k, v, causal=True)
    except RuntimeError:
        return False
    return agrees(o, lse, *exact_attention_lse(q, k, v, causal=True))
