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
    from .budget import JobMemory
    from .config import ModelConfig
    from .engine import Engine

T = TypeVar("T")


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
        self._job_memory(config, dtype, spec, cache).refuse_unless_it_fits(self.dist, self.device, tp, runtime.model)
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
        from .launch.control import JobError, ranks_named

        every = self.dist.allgather(config)
        others = [rank for rank, theirs in enumerate(every) if theirs != every[0]]
        if others:
            raise JobError(f"--model {self.runtime.model} is another model on {ranks_named(others)} than on rank 0: "
                           "every rank must read the same checkpoint")
        return config

    def _job_memory(self, config: ModelConfig, dtype: torch.dtype, spec: StrategySpec | None,
                    cache: KVCacheSettings | None) -> JobMemory:
        """What the busiest rank will hold: its host's share of the weights (all of them with
        --tp 1), and the KV cache of the engine `spec` and `cache` describe, if given (unless
        its requests go beyond the trained positions unasked, which Session.engine refuses)."""
        from .budget import JobMemory
        from .launch.control import Place
        from .slots import arena_capacities

        hosts, trained = self.hosts.count, config.max_position_embeddings
        max_tokens = cache.tokens(trained) if cache is not None else trained
        if spec is None or cache is None or (max_tokens > trained and not cache.beyond_trained_positions):
            return JobMemory(config, dtype, hosts)
        strategy = spec.build(Place(0, hosts), None, config, self.calibration)
        slots = max(arena_capacities(strategy, max_tokens, max_tokens))
        return JobMemory(config, dtype, hosts, cache.batch * slots, max_tokens, cache.batch)

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
