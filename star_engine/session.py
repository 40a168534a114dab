"""The session of a command: this rank's place in the job and its host, its device, the
model (this rank's shard of it under --tp), the communicator among the ranks that hold the
same heads on every host, and (on rank 0) the tokenizer, shared by the engines the command
builds."""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING, Callable, TypeVar

import torch

from .attention.backends import backend_for, set_backend
from .attention.spec import StrategySpec
from .costs import Calibration

if TYPE_CHECKING:
    from .config import ModelConfig
    from .engine import Engine

T = TypeVar("T")

# Beyond the weights, what a rank needs at the least to run anything (activations, kernels'
# workspace, the smallest KV cache).
WEIGHTS_HEADROOM_BYTES = 1 << 30


class Session:
    def __init__(self, args: argparse.Namespace) -> None:
        from .checkpoint import load_config, load_model
        from .comm import make_communicator, make_host_group
        from .hosts import Hosts
        from .launch.devices import select_device
        from .launch.launcher import init_distributed
        from .tokenizer import load_tokenizer

        self.args = args
        self.dist = init_distributed()
        # Rank 0 decides what changes the math (device, so dtype; kernels; calibration): the
        # ranks of a job need not see the same machine or files.
        kind = args.device or self.dist.bcast("cuda" if torch.cuda.is_available() else "cpu", root=0)
        self.device = select_device(kind, self.dist)
        dtype = getattr(torch, args.dtype or ("bfloat16" if self.device.type == "cuda" else "float32"))
        tp = getattr(args, "tp", 1)
        hosts = f", {plural(self.dist.world // tp, 'host')} of {tp}" if tp > 1 else ""
        self.say(f"star_engine: loading {args.model} on {plural(self.dist.world, 'rank')} "
                 f"({plural(self.dist.nodes, 'node')}{hosts}), {self.device.type}, {dtype}")
        start = time.perf_counter()
        self.hosts = Hosts(self.dist, tp)
        self.calibration = self._job_calibration()
        config = self._same_model_everywhere(self._on_every_rank(lambda: load_config(args.model)))
        shard = self.hosts.shard(config)
        self._refuse_what_cannot_fit(config, dtype)
        host = make_host_group(self.hosts.members, self.device) if self.hosts.members is not None else None
        self.model = self._on_every_rank(lambda: load_model(args.model, dtype, self.device, shard=shard, host=host))
        set_backend(args.attn_backend)
        backend = self.dist.bcast(backend_for(self.device, dtype) if self.dist.rank == 0 else None, root=0)
        set_backend(backend)
        self.comm = make_communicator(self.hosts.peers, self.device)
        eos = self.model.config.eos_token_ids
        self.tokenizer = load_tokenizer(args.model, eos) if self.dist.rank == 0 else None
        self.dist.sync()
        self.say(f"star_engine: ready in {time.perf_counter() - start:.1f} s; attention kernels: {backend}")

    def _job_calibration(self) -> Calibration:
        """The device's rates that the balanced layout weighs blocks by: the file rank 0
        reads, handed to every rank (a node may hold another file by that name, or none)."""
        from .launch.control import JobError

        found: tuple[Calibration | None, str | None] = (None, None)
        if self.dist.rank == 0:
            try:
                found = (Calibration.load(), None)
            except ValueError as exc:
                found = (None, str(exc))
        calibration, error = self.dist.bcast(found, root=0)
        if error is not None:
            raise JobError(error)
        return calibration

    def _on_every_rank(self, load: Callable[[], T]) -> T:
        """load() on every rank; a ValueError (a file cut short, say) on any of them ends the
        job with one message, rank 0's, naming the ranks where they differ."""
        from .launch.control import JobError
        from .launch.ending import job_problem

        loaded = []

        def find() -> str | None:
            try:
                loaded.append(load())
            except ValueError as exc:
                return str(exc)
            return None

        problem = job_problem(find)
        if problem is not None:
            raise JobError(problem)
        return loaded[0]

    def _same_model_everywhere(self, config: ModelConfig) -> ModelConfig:
        """`config`, where every rank read the same shape under --model; else a JobError."""
        from .launch.control import JobError

        every = self.dist.allgather(config)
        others = [rank for rank, theirs in enumerate(every) if theirs != every[0]]
        if others:
            raise JobError(f"--model {self.args.model} is another model on rank{'s' * (len(others) > 1)} "
                           f"{', '.join(map(str, others))} than on rank 0: every rank must read the same checkpoint")
        return config

    def _refuse_what_cannot_fit(self, config: ModelConfig, dtype: torch.dtype) -> None:
        """Before any weight is built: a rank holds its host's share of the weights (all of
        them with --tp 1), and for `run` its KV cache for --max-tokens (and --batch) too, so
        a rank that has not the memory ends the job with one line (the same on every rank)
        that says what it needs and the --tp that would fit, not an allocator's traceback
        part way."""
        from .launch.control import JobError
        from .memory import available_memory

        tp, hosts = self.hosts.tp, self.hosts.count
        free = [f for f in self.dist.allgather(available_memory(self.device)) if f is not None]
        if not free:
            return
        least = min(free)
        weights, cache = self._bytes_per_rank(config, dtype, tp, hosts)
        if weights + cache + WEIGHTS_HEADROOM_BYTES <= least:
            return
        fits = next((n for n in (2, 4, 8, 16) if n > tp and self._fits(config, dtype, n, hosts, least)), None)
        advice = (f"--tp {fits} (with {fits * hosts} ranks) would fit" if fits else
                  f"no --tp up to 16 would fit with {plural(hosts, 'host')}")
        every = "every rank" if tp == 1 else f"every rank of a host of {tp}"
        if weights + WEIGHTS_HEADROOM_BYTES > least:
            raise JobError(f"{self.args.model} in {str(dtype).removeprefix('torch.')} takes {weights / 2**30:.1f} "
                           f"GiB of weights on {every}, and a rank's {self.device.type} has {least / 2**30:.1f} GiB "
                           f"free: {advice}, or a device with more memory, a smaller --dtype or model")
        raise JobError(f"a KV cache for {self._cache_phrase(config)} needs {cache / 2**30:.1f} GiB on {every}, which "
                       f"has {(least - weights) / 2**30:.1f} GiB free beside the weights: a smaller --max-tokens"
                       f"{' or --batch' if getattr(self.args, 'batch', 1) > 1 else ''}, more ranks, or {advice}")

    def _bytes_per_rank(self, config: ModelConfig, dtype: torch.dtype, tp: int, hosts: int) -> tuple[int, int]:
        """Weights and (for `run`) KV cache of the busiest rank of `hosts` hosts of tp ranks."""
        from .costs import kv_bytes_per_token, rank_weights
        from .launch.control import Place
        from .shard import Shard
        from .slots import arena_capacities

        spec, batch = getattr(self.args, "spec", None), getattr(self.args, "batch", 1)
        max_tokens = self._max_tokens(config)
        weights = rank_weights(config, tp) * dtype.itemsize
        if spec is None or (max_tokens > config.max_position_embeddings
                            and not getattr(self.args, "beyond_trained_positions", False)):
            return weights, 0
        slots = max(arena_capacities(spec.build(Place(0, hosts), None, config, self.calibration), max_tokens,
                                     max_tokens))
        kv_heads = len(Shard.of(config, 0, tp).kv_heads)
        return weights, batch * slots * kv_bytes_per_token(config, dtype.itemsize, kv_heads)

    def _fits(self, config: ModelConfig, dtype: torch.dtype, tp: int, hosts: int, free: int) -> bool:
        from .shard import split_problem

        if split_problem(config, tp):
            return False
        return sum(self._bytes_per_rank(config, dtype, tp, hosts)) + WEIGHTS_HEADROOM_BYTES <= free

    def _cache_phrase(self, config: ModelConfig) -> str:
        from .engine import requests_phrase

        return requests_phrase(self._max_tokens(config), getattr(self.args, "batch", 1))

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
        from .engine import Engine
        from .launch.control import JobError

        trained = self.model.config.max_position_embeddings
        max_tokens = max_tokens or self._max_tokens(self.model.config)
        if max_tokens > trained:
            if not getattr(self.args, "beyond_trained_positions", False):
                raise JobError(f"--max-tokens {max_tokens} is beyond the {trained} positions {self.args.model} was "
                               "trained for, where its answers cannot be trusted; --beyond-trained-positions "
                               "runs it anyway")
            self.say(f"star_engine: warning: requests of up to {max_tokens} tokens, beyond the {trained} positions "
                     f"{self.args.model} was trained for")
        strategy = spec.build(self.comm.place, self.comm, self.model.config, self.calibration)
        return Engine(self.model, strategy, self.comm, self.dist, max_tokens,
                      cuda_graph=not self.args.no_cuda_graph, max_tail=max_tail, batch=batch)


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'s' if count != 1 else ''}"
