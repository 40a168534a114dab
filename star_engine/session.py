"""The session of a command: this rank's place in the job and its host, its device, the
model (this rank's shard of it under --tp), the communicator among the ranks that hold the
same heads on every host, and (on rank 0) the tokenizer, shared by the engines the command
builds."""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Callable, TypeVar

import torch

from .attention.backends import backend_for, set_backend
from .attention.spec import StrategySpec
from .costs import Calibration
from .settings import KVCacheSettings, RuntimeSettings, ScaleOutSettings

if TYPE_CHECKING:
    from .budget import JobMemory
    from .config import ModelConfig
    from .engine import Engine
    from .groups import HostGroup, HostGroups, RequestSizing
    from .prediction import Prediction

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
        from .slots import engine_kv_slots

        hosts, trained = self.hosts.count, config.max_position_embeddings
        max_tokens = cache.tokens(trained) if cache is not None else trained
        if spec is None or cache is None or (max_tokens > trained and not cache.beyond_trained_positions):
            return JobMemory(config, dtype, hosts)
        strategy = spec.build(Place(0, hosts), None, config, self.calibration)
        return JobMemory(config, dtype, hosts, engine_kv_slots(strategy, max_tokens, cache.tail(max_tokens), cache),
                         max_tokens, cache.batch)

    def say(self, message: str) -> None:
        """A progress line on stderr, from rank 0."""
        if self.dist.rank == 0:
            print(message, file=sys.stderr, flush=True)

    def group_engines(self, spec: StrategySpec, cache: KVCacheSettings, scale_out: ScaleOutSettings
                      ) -> tuple[HostGroups, dict[int, Engine], RequestSizing]:
        """The groups of hosts that scale_out asks for, with their communicators, and an
        engine for each group of this rank, its arenas parked until the group works: on one
        host dense, on several the strategy of `spec`. The group of all hosts has the KV
        cache `cache` asks for; smaller groups one for the requests the rule gives them, less
        where the memory has not room for it (their requests then go to larger groups)."""
        from .attention.spec import StrategySpec
        from .budget import JobMemory, fits, least_free_memory
        from .dispatch import described, group_sizes
        from .groups import MIN_GROUP_TOKENS, HostGroups, RequestSizing, default_max_block, level_max_tokens
        from .launch.control import JobError, Place
        from .slots import engine_kv_slots

        count, config = self.hosts.count, self.model.config
        sizes = group_sizes(count) if scale_out.hosts_per_request == "auto" else [scale_out.fixed or count]
        if sizes[0] not in group_sizes(count):
            raise JobError(f"--hosts-per-request {sizes[0]}: {described(count)}")
        groups = HostGroups(self.dist, self.hosts, self.comm, self.device, sizes)
        if len(sizes) > 1 or sizes[0] < count:
            memory = f" and {groups.setup_bytes / 2**20:.0f} MiB of GPU memory" if groups.setup_bytes else ""
            self.say(f"star_engine: {described(count)}; their communicators took {groups.setup_s:.1f} s{memory} "
                     "per rank")
        max_block = scale_out.max_block or default_max_block(config)
        job_tokens = cache.tokens(config.max_position_embeddings)
        free = least_free_memory(self.dist, self.device)
        engines: dict[int, Engine] = {}
        for size in sizes:
            level_spec = spec if size > 1 else StrategySpec("dense")
            tokens = job_tokens if size == count else level_max_tokens(size, max_block, job_tokens)

            def fitting(tokens: int) -> bool:
                strategy = level_spec.build(Place(0, size), None, config, self.calibration)
                memory = JobMemory(config, self.model.embed.weight.dtype, size,
                                   engine_kv_slots(strategy, tokens, cache.tail(tokens), cache), tokens, cache.batch)
                return fits(memory.at(self.hosts.tp), free, weights_in_place=True)

            while size < count and tokens and not fitting(tokens):
                # This group size takes shorter requests (the longer go to larger groups); none
                # below MIN_GROUP_TOKENS.
                tokens = tokens // 2 if tokens // 2 >= MIN_GROUP_TOKENS else 0
            if not tokens:
                self.say(f"star_engine: no room for the KV cache of groups of {size} hosts: their requests go "
                         "to larger groups")
                continue
            group = groups.by_size.get(size)
            if group is not None:
                engines[size] = self.engine(level_spec, replace(cache, max_tokens=tokens), group)
                engines[size].park()
        return groups, engines, RequestSizing(engines, count, scale_out, max_block, self._predicted(spec))

    def _predicted(self, spec: StrategySpec) -> Callable[[int, int, int, int], Prediction]:
        """The planner's prediction of a request on some hosts, from the job's calibration."""
        from .attention.spec import StrategySpec
        from .prediction import predict

        config, element_size = self.model.config, self.model.embed.weight.element_size()

        def predicted(hosts: int, context: int, query: int, new_tokens: int) -> Prediction:
            on = spec if hosts > 1 else StrategySpec("dense")
            return predict(config, on, hosts, context, query, new_tokens, self.calibration, element_size)

        return predicted

    def engine(self, spec: StrategySpec, cache: KVCacheSettings, group: HostGroup | None = None) -> Engine:
        """An engine of the strategy `spec` names, its KV cache sized as `cache` says, on the
        group of hosts `group` (default: all of them)."""
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
        comm, dist = (self.comm, self.dist) if group is None else (group.comm, group.dist)
        strategy = spec.build(comm.place, comm, self.model.config, self.calibration)
        return Engine(self.model, strategy, comm, dist, cache, cuda_graph=self.runtime.cuda_graph)


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'s' if count != 1 else ''}"
