"""The flags the commands share, defined once: what each means, its default, its check."""

from __future__ import annotations

import argparse
import torch

from .attention.local import BACKENDS
from .checkpoint import BUILTIN_MODELS, DEFAULT_MODEL
from .model import PRESETS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def anchor_size(text: str) -> int | float:
    """Tokens (an integer) or a fraction of the block (1/4, 0.5, block)."""
    if text.strip().isdigit():
        return positive(text)
    from .evaluation import parse_anchor

    try:
        return parse_anchor(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def token_counts(text: str, flag: str = "--lengths") -> list[int]:
    """'32K,64K,1M' -> [32768, 65536, 1048576] (K = 1024)."""
    from .benchmark import parse_tokens

    try:
        counts = [parse_tokens(t.strip()) for t in text.split(",") if t.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise ValueError(f"{flag} {text!r}: expected token counts such as 32K,64K,1M")
    return counts


def add_model_flags(parser: argparse.ArgumentParser, model: str = DEFAULT_MODEL) -> None:
    models = ", ".join([*BUILTIN_MODELS, *PRESETS])
    parser.add_argument("--model", default=model,
                        help=f"built-in model or shape preset ({models}), a Hugging Face checkpoint "
                             f"directory (config.json + *.safetensors) or a .gguf file (default: {model})")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="weights and activations (default: float32 on cpu, bfloat16 on cuda)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="one GPU per rank, or CPU tensors (default: cuda when available)")
    parser.add_argument("--no-cuda-graph", action="store_true",
                        help="decode eagerly instead of replaying each step from a CUDA graph")
    parser.add_argument("--attn-backend", choices=BACKENDS, default="auto",
                        help="kernels of prefill and the query pass: cudnn, flash-attn (if installed) or "
                             "PyTorch's flash kernel on GPUs, torch (exact float32 where the log-sum-exp is "
                             "needed) on CPUs and for float32 (default: auto, the first of these that works)")


def add_star_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--block-size", type=positive, default=None,
                        help="star: context tokens per block (default: the context divided by the ranks)")
    parser.add_argument("--anchor-size", type=anchor_size, default=None,
                        help="star: the anchor, the start of block 0: tokens (4096), or a fraction of the "
                             "block (1/4, 0.5, block) (default: the block)")
    parser.add_argument("--anchor-mode", choices=("broadcast", "recompute"), default="broadcast",
                        help="star: the anchor's K/V is computed once and broadcast layer by layer, "
                             "or recomputed by every rank that needs it (default: broadcast)")


def check_star_flags(args: argparse.Namespace) -> None:
    if args.block_size and isinstance(args.anchor_size, int) and args.anchor_size > args.block_size:
        raise ValueError(f"--anchor-size {args.anchor_size} exceeds --block-size {args.block_size}")


def add_generation_flags(parser: argparse.ArgumentParser, max_new_tokens: int, sized: bool = True) -> None:
    parser.add_argument("--max-new-tokens", type=positive, default=max_new_tokens,
                        help=f"tokens to generate at most, unless a request says otherwise "
                             f"(default: {max_new_tokens})")
    if sized:
        parser.add_argument("--max-tokens", type=positive, default=None,
                            help="longest request (context + query + generated tokens) the KV cache is "
                                 "sized for; longer ones are refused (default: the model's context length)")
