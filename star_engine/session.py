"""The session of a command: this rank's place in the job, its device, the model, the
communicator and (on rank 0) the tokenizer, shared by the engines the command builds."""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING

import torch

from .attention.backends import backend_for, set_backend
from .attention.spec import StrategySpec

if TYPE_CHECKING:
    from .config import ModelConfig
    from .schedule import Engine

# Beyond the weights, what a rank needs at the least to run anything (activations, kernels'
# workspace, the smallest KV cache).
WEIGHTS_HEADROOM_BYTES = 1 << 30


class Session:
    def __init__(self, args: argparse.Namespace) -> None:
        from .checkpoint import load_config, load_model
        from .comm import make_communicator
        from .launch import init_distributed, select_device
        from .tokenizer import load_tokenizer

        self.args = args
        self.dist = init_distributed()
        self.device = select_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"), self.dist)
        dtype = getattr(torch, args.dtype or ("bfloat16" if self.device.type == "cuda" else "float32"))
        self.say(f"star_engine: loading {args.model} on {plural(self.dist.world, 'rank')} "
                 f"({plural(self.dist.nodes, 'node')}), {self.device.type}, {dtype}")
        start = time.perf_counter()
        self._refuse_what_cannot_fit(load_config(args.model), dtype)
        self.model = load_model(args.model, dtype, self.device)
        set_backend(args.attn_backend)
        backend = backend_for(self.device, dtype)
        self.comm = make_communicator(self.dist, self.device)
        eos = self.model.config.eos_token_ids
        self.tokenizer = load_tokenizer(args.model, eos) if self.dist.rank == 0 else None
        self.dist.sync()
        self.say(f"star_engine: ready in {time.perf_counter() - start:.1f} s; attention kernels: {backend}")

    def _refuse_what_cannot_fit(self, config: ModelConfig, dtype: torch.dtype) -> None:
        """Before any weight is built: every rank holds all of them, and for `run` its KV
        cache for --max-tokens (and --batch) too, so a rank that has not the memory ends the
        job with one line (the same on every rank), not an allocator's traceback part way."""
        from .costs import kv_bytes_per_token, model_weights
        from .launch import JobError
        from .memory import available_memory
        from .schedule import arena_capacities, cache_flags, requests_phrase

        weights = model_weights(config) * dtype.itemsize
        spec, batch = getattr(self.args, "spec", None), getattr(self.args, "batch", 1)
        max_tokens = self._max_tokens(config)
        caches = [0] * self.dist.world
        if spec is not None and (max_tokens <= config.max_position_embeddings
                                 or getattr(self.args, "beyond_trained_positions", False)):
            slots = arena_capacities(spec.build(self.dist, None, config), max_tokens, max_tokens)
            caches = [batch * n * kv_bytes_per_token(config, dtype.itemsize) for n in slots]
        for rank, free in enumerate(self.dist.allgather(available_memory(self.device))):
            if free is None:
                continue
            if weights + WEIGHTS_HEADROOM_BYTES > free:
                raise JobError(f"{self.args.model} in {str(dtype).removeprefix('torch.')} takes "
                               f"{weights / 2**30:.1f} GiB of weights on every rank, and rank {rank}'s "
                               f"{self.device.type} has {free / 2**30:.1f} GiB free; every rank holds the whole "
                               "model (tensor parallelism is not supported yet): a device with more memory, a "
                               "smaller --dtype, or a smaller model")
            if weights + caches[rank] + WEIGHTS_HEADROOM_BYTES > free:
                raise JobError(f"a KV cache for {requests_phrase(max_tokens, batch)} needs "
                               f"{caches[rank] / 2**30:.1f} GiB on rank {rank}, which has "
                               f"{(free - weights) / 2**30:.1f} GiB free beside the weights: a smaller "
                               f"{cache_flags(batch)}, or more ranks")

    def _max_tokens(self, config: ModelConfig) -> int:
        """The longest request a KV cache is sized for: --max-tokens, else the model's context length."""
        return getattr(self.args, "max_tokens", None) or config.max_position_embeddings

    def say(self, message: str) -> None:
        """A progress line on stderr, from rank 0."""
        if self.dist.rank == 0:
            print(message, file=sys.stderr, flush=True)

    def engine(self, spec: StrategySpec, max_tokens: int | None = None, max_tail: int | None = None,
               batch: int = 1) -> Engine:
        """An engine of the strategy `spec` names, sized for `batch` requests at once of up
        to max_tokens (default: --max-tokens, else the model's context length), of which at
        most max_tail come after the context."""
        from .launch import JobError
        from .schedule import Engine

        trained = self.model.config.max_position_embeddings
        max_tokens = max_tokens or self._max_tokens(self.model.config)
        if max_tokens > trained:
            if not getattr(self.args, "beyond_trained_positions", False):
                raise JobError(f"--max-tokens {max_tokens} is beyond the {trained} positions {self.args.model} was "
                               "trained for, where its answers cannot be trusted; --beyond-trained-positions "
                               "runs it anyway")
            self.say(f"star_engine: warning: requests of up to {max_tokens} tokens, beyond the {trained} positions "
                     f"{self.args.model} was trained for")
        return Engine(self.model, spec.build(self.dist, self.comm, self.model.config), self.comm, self.dist, max_tokens,
                      cuda_graph=not self.args.no_cuda_graph, max_tail=max_tail, batch=batch)


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'s' if count != 1 else ''}"
