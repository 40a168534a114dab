"""What a job of many requests will take, served as `run` serves them with each way of
--hosts-per-request: each request's cost predicted alone (prediction.py) on the group size
it gets, then the job played out under the policy the runtime follows (dispatch.py). A
group admits requests one at a time (phase 1 and the query) between the decode steps of
those it holds, up to its batch; a step reads the weights once and each row's K/V, a
context that several rows share once for all of them. Where requests come `questions` to
a context, a request pays its phase 1 unless the request its group took before it asked
about the same context, and only its query then."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..attention.spec import StrategySpec
from ..config import ModelConfig
from ..costs import Calibration
from ..dispatch import LATER, Dispatch, Group, read_ahead
from ..groups import default_max_block, hosts_by_rule
from ..settings import ScaleOutSettings
from ..prediction import Prediction, predict
from .mixed_job import spread


@dataclass
class _Running:
    """A group of the played-out job: its clock, its rows (tokens still to decode, the K/V
    read of a step, the request, the rest of a step's time), and the context it encoded last."""
    clock: float
    rows: list[list] = field(default_factory=list)
    exhausted: bool = False
    context: int | None = None


def predict_job(config: ModelConfig, spec: StrategySpec, hosts: int, lengths: list[int], query_tokens: int,
                new_tokens: int, batch: int, way: ScaleOutSettings, calibration: Calibration, element_size: int = 2,
                gpus_per_node: int | None = None, questions: int = 1) -> dict:
    """The predicted wall time and rates of the job of these context lengths (in order) on
    `hosts` hosts of one GPU each, and the group size each length gets. Requests come
    `questions` at a time to one context (of the first one's length)."""
    max_block = way.max_block or default_max_block(config)
    fixed = way.fixed

    def size_of(length: int) -> int:
        if way.hosts_per_request == "auto":
            return hosts_by_rule(length, max_block, hosts)
        return fixed or hosts

    costs: dict[tuple[int, int], Prediction] = {}
    for length in set(lengths):
        size = size_of(length)
        costs[length, size] = predict(config, spec if size > 1 else StrategySpec("dense"), size, length,
                                      query_tokens, new_tokens, calibration, element_size, gpus_per_node)
    dispatch = Dispatch(hosts, read_ahead(batch, hosts))
    for number, length in enumerate(lengths):
        cost = costs[length, size_of(length)]
        dispatch.add(number, size_of(length), cost.ttft_s + (new_tokens - 1) * cost.tpot_s,
                     number // questions if questions > 1 else None)
    running: dict[Group, _Running] = {group: _Running(0.0) for group in dispatch.start()}
    first, finished = {}, {}
    while running:
        group = min(running, key=lambda g: (running[g].clock, g.first, g.size))
        state = running[group]
        if len(state.rows) < batch and not state.exhausted:
            number = dispatch.give(group)
            if number == LATER and not state.rows:
                raise AssertionError("a group told to wait holds no request")
            if number is not None and number != LATER:
                cost = costs[lengths[number], group.size]
                context = number // questions
                ttft = cost.ttft_s - (cost.phase1_s if context == state.context else 0.0)  # encoded there already
                state.context = context
                state.clock += ttft
                first[number] = ttft
                if new_tokens > 1:
                    state.rows.append([new_tokens - 1, cost.decode_kv_s, number, cost.tpot_s - cost.decode_kv_s])
                else:
                    finished[number] = state.clock
                    dispatch.answered(group, number)
                continue
            state.exhausted = number is None
        if state.rows:
            read = {row[2] // questions: row[1] for row in state.rows}  # each context's K/V once
            state.clock += max(row[3] for row in state.rows) + sum(read.values())
            for row in state.rows:
                row[0] -= 1
                if row[0] == 0:
                    finished[row[2]] = state.clock
                    dispatch.answered(group, row[2])
            state.rows = [row for row in state.rows if row[0] > 0]
            continue
        dispatch.release(group)
        del running[group]
        running.update({g: _Running(state.clock) for g in dispatch.start()})
    wall = max(finished.values())
    return {"hosts_per_request": way.hosts_per_request, "hosts": hosts, "wall_s": wall,
            "requests_per_hour": len(lengths) / wall * 3600,
            "output_tokens_per_s": len(lengths) * new_tokens / wall,
            "hosts_by_length": {str(n): size_of(n) for n in sorted(set(lengths))},
            "ttft_s_by_length": {str(n): costs[n, size_of(n)].ttft_s for n in sorted(set(lengths))},
            "latency_s_by_length": {str(n): spread([finished[i] for i, m in enumerate(lengths) if m == n])
                                    for n in sorted(set(lengths))},
            "latency_s": [finished[i] for i in range(len(lengths))]}
