"""The session of a command: this rank's place in the job and its host, its device, the
model (this rank's shard of it under --tp), the communicator among the ranks that hold the
same heads on every host, and (on rank 0) the tokenizer, shared by the engines the command
builds."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Callable, TypeVar

import torch

from .attention.backends import backend_for, set_backend
from .attention.spec import StrategySpec
from .costs import Calibration
from .settings import KVCacheSettings, RuntimeSettings

if TYPE_CHECKING:
    from .config import ModelConfig
    from .engine import Engine

T = TypeVar("T")

# Beyond the weights, what a rank needs at the least to run anything (activations, kernels'
# workspace, the smallest KV cache).
WEIGHTS_HEADROOM_BYTES = 1 << 30


class Session:
    def __init__(self, runtime: RuntimeSettings, spec: StrategySpec | None = None,
                 cache: KVCacheSettings | None = None) -> None:
        """spec, cache: the engine the command runs, where it knows it before the model is
        loaded (run's): its KV cache is then counted with the weights, so that a rank
        without the memory for both ends the job before any weight is built."""
        from .checkpoint import load_config, load_model
        from .comm import make_communicator, make_host_group
        from .hosts import Hosts
        from .launch.devices import select_device
        from .launch.launcher import init_distributed
        from .tokenizer import load_tokenizer

        self.runtime = runtime
        self.dist = init_distributed()
        # Rank 0 decides what changes the math (device, so dtype; kernels; calibration): the
        # ranks of a job need not see the same machine or files.
        kind = runtime.device or self.dist.bcast("cuda" if torch.cuda.is_available() else "cpu", root=0)
        self.device = select_device(kind, self.dist)
        dtype = getattr(torch, runtime.dtype or ("bfloat16" if self.device.type == "cuda" else "float32"))
        tp = runtime.tp
        hosts = f", {plural(self.dist.world // tp, 'host')} of {tp}" if tp > 1 else ""
        self.say(f"star_engine: loading {runtime.model} on {plural(self.dist.world, 'rank')} "
                 f"({plural(self.dist.nodes, 'node')}{hosts}), {self.device.type}, {dtype}")
        start = time.perf_counter()
        self.hosts = Hosts(self.dist, tp)
        self.calibration = self._job_calibration()
        config = self._same_model_everywhere(self._on_every_rank(lambda: load_config(runtime.model)))
        shard = self.hosts.shard(config)
        self._refuse_what_cannot_fit(config, dtype, spec, cache)
        host = make_host_group(self.hosts.members, self.device) if self.hosts.members is not None else None
        self.model = self._on_every_rank(lambda: load_model(runtime.model, dtype, self.device, shard=shard, host=host))
        set_backend(runtime.attn_backend)
        backend = self.dist.bcast(backend_for(self.device, dtype) if self.dist.rank == 0 else None, root=0)
        set_backend(backend)
        self.comm = make_communicator(self.hosts.peers, self.device)
        eos = self.model.config.eos_token_ids
        self.tokenizer = load_tokenizer(runtime.model, eos) if self.dist.rank == 0 else None
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
            raise JobError(f"--model {self.runtime.model} is another model on rank{'s' * (len(others) > 1)} "
                           f"{', '.join(map(str, others))} than on rank 0: every rank must read the same checkpoint")
        return config

    def _refuse_what_cannot_fit(self, config: ModelConfig, dtype: torch.dtype, spec: StrategySpec | None,
                                cache: KVCacheSettings | None) -> None:
        """Before any weight is built: a rank holds its host's share of the weights (all of
        them with --tp 1), and with spec and cache (run's engine) its KV cache too, so a rank
        that has not the memory ends the job with one line (the same on every rank) that
        says what it needs and the --tp that would fit, not an allocator's traceback part way."""
        from .engine import cache_flags, requests_phrase
        from .launch.control import JobError
        from .memory import available_memory

        tp, hosts = self.hosts.tp, self.hosts.count
        free = [f for f in self.dist.allgather(available_memory(self.device)) if f is not None]
        if not free:
            return
        least = min(free)
        weights, kv = self._bytes_per_rank(config, dtype, tp, hosts, spec, cache)
        if weights + kv + WEIGHTS_HEADROOM_BYTES <= least:
            return
        fits = next((n for n in (2, 4, 8, 16)
                     if n > tp and self._fits(config, dtype, n, hosts, spec, cache, least)), None)
        advice = (f"--tp {fits} (with {fits * hosts} ranks) would fit" if fits else
                  f"no --tp up to 16 would fit with {plural(hosts, 'host')}")
        every = "every rank" if tp == 1 else f"every rank of a host of {tp}"
        if weights + WEIGHTS_HEADROOM_BYTES > least:
            raise JobError(f"{self.runtime.model} in {str(dtype).removeprefix('torch.')} takes "
                           f"{weights / 2**30:.1f} GiB of weights on {every}, and a rank's {self.device.type} has "
                           f"{least / 2**30:.1f} GiB free: {advice}, or a device with more memory, a smaller "
                           "--dtype or model")
        requests = requests_phrase(cache.tokens(config.max_position_embeddings), cache.batch)
        raise JobError(f"a KV cache for {requests} needs {kv / 2**30:.1f} GiB on {every}, which has "
                       f"{(least - weights) / 2**30:.1f} GiB free beside the weights: a smaller "
                       f"{cache_flags(cache.batch)}, more ranks, or {advice}")

    def _bytes_per_rank(self, config: ModelConfig, dtype: torch.dtype, tp: int, hosts: int,
                        spec: StrategySpec | None, cache: KVCacheSettings | None) -> tuple[int, int]:
        """Weights and (with spec and cache) KV cache of the busiest rank of `hosts` hosts of tp ranks."""
        from .costs import kv_bytes_per_token, rank_weights
        from .launch.control import Place
        from .shard import Shard
        from .slots import arena_capacities

        weights = rank_weights(config, tp) * dtype.itemsize
        trained = config.max_position_embeddings
        max_tokens = cache.tokens(trained) if cache is not None else trained
        if spec is None or cache is None or (max_tokens > trained and not cache.beyond_trained_positions):
            return weights, 0
        slots = max(arena_capacities(spec.build(Place(0, hosts), None, config, self.calibration), max_tokens,
                                     max_tokens))
        kv_heads = len(Shard.of(config, 0, tp).kv_heads)
        return weights, cache.batch * slots * kv_bytes_per_token(config, dtype.itemsize, kv_heads)

    def _fits(self, config: ModelConfig, dtype: torch.dtype, tp: int, hosts: int, spec: StrategySpec | None,
              cache: KVCacheSettings | None, free: int) -> bool:
        from .shard import split_problem

        if split_problem(config, tp):
            return False
        return sum(self._bytes_per_rank(config, dtype, tp, hosts, spec, cache)) + WEIGHTS_HEADROOM_BYTES <= free

    def say(self, message: str) -> None:
        """A progress line on stderr, from rank 0."""
        if self.dist.rank == 0:
            print(message, file=sys.stderr, flush=True)

    def engine(self, spec: StrategySpec, cache: KVCacheSettings) -> Engine:
        """An engine of the strategy `spec` names, its KV cache sized as `cache` says."""
        from .engine import Engine
        from .launch.control import JobError

        trained = self.model.config.max_position_embeddings
        max_tokens = cache.tokens(trained)
        if max_tokens > trained:
            if not cache.beyond_trained_positions:
                raise JobError(f"--max-tokens {max_tokens} is beyond the {trained} positions {self.runtime.model} "
                               "was trained for, where its answers cannot be trusted; --beyond-trained-positions "
                               "runs it anyway")
            self.say(f"star_engine: warning: requests of up to {max_tokens} tokens, beyond the {trained} positions "
                     f"{self.runtime.model} was trained for")
        strategy = spec.build(self.comm.place, self.comm, self.model.config, self.calibration)
        return Engine(self.model, strategy, self.comm, self.dist, cache, cuda_graph=self.runtime.cuda_graph)


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'s' if count != 1 else ''}"
