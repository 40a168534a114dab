"""Accuracy of Star Attention against dense attention on long-context tasks (tasks.py):
every method answers the same samples, scored by RULER's string match."""

from __future__ import annotations

import time
from typing import Callable

import torch

from ..attention.spec import StrategySpec
from ..comm import Communicator
from ..costs import Calibration
from ..engine import Engine
from ..launch.control import Dist
from ..model import Transformer
from ..settings import KVCacheSettings
from .tasks import make_sample, score
from .text_table import text_table

# Tokens each task may generate (its answers are short; lists take more).
NEW_TOKENS = {"niah_multivalue": 64, "niah_multiquery": 64, "vt": 48, "cwe": 96, "fwe": 48}
DEFAULT_NEW_TOKENS = 32


def new_tokens(task: str, cap: int | None = None) -> int:
    """The tokens an answer of `task` may take: the task's own number, or `cap` if smaller."""
    own = NEW_TOKENS.get(task, DEFAULT_NEW_TOKENS)
    return own if cap is None else min(own, cap)


def run_evaluation(model: Transformer, tokenizer, comm: Communicator, dist: Dist, tasks: list[str],
                   lengths: list[int], samples: int, specs: list[StrategySpec], calibration: Calibration, seed: int,
                   say: Callable[[str], None],
                   on_cell: Callable[[list[dict]], None] = lambda rows: None,
                   earlier: list[dict] = (), progress_every_s: float = 60.0,
                   max_new_tokens: int | None = None, batch: int = 1) -> list[dict]:
    """One row per (task, length, sample, method) on rank 0, the method named by its
    spec's label; an empty list elsewhere. Each answer takes new_tokens(task, max_new_tokens)
    tokens at most; each method answers a cell's samples up to `batch` at a time, decoding
    together (Engine.generate_many: each answer the one its sample gets alone, but for the
    rounding of a batch's products in bfloat16).
    on_cell(rows so far) runs on rank 0 after each (task, length), so that a long run can
    keep what it has measured if it is stopped. The (task, length) cells that `earlier`
    (rows of a stopped run, the same on every rank) holds whole are kept, not measured again;
    its rows of cells not asked for stay too. Each cell's line says how long the rest should
    take; inside a cell a line every `progress_every_s` seconds says where it is."""
    kept = finished_cells(earlier, tasks, lengths, samples, [spec.label for spec in specs], seed)
    # Earlier rows stay, but for the cells asked for and not finished: those are measured anew.
    asked = {(t, n) for t in tasks for n in lengths}
    rows: list[dict] = [dict(r) for r in earlier if (r["task"], r["length"]) in kept
                        or (r["task"], r["length"]) not in asked] if dist.rank == 0 else []
    most_new = max(new_tokens(t, max_new_tokens) for t in tasks)
    total = len(tasks) * len(lengths) * samples
    done = 0
    clock = _Clock((total - len(kept) * samples) * len(specs))
    if kept:
        say(f"kept {len(kept)} (task, length) cells of the earlier run")
    for length in lengths:
        if all((task, length) in kept for task in tasks):
            done += len(tasks) * samples
            continue
        engines = {spec.label: Engine(model, spec.build(comm.place, comm, model.config, calibration), comm, dist,
                                      KVCacheSettings(length + most_new, batch))
                   for spec in specs}
        for task in tasks:
            if (task, length) in kept:
                done += samples
                continue
            cell = [make_sample(task, tokenizer, length, seed + index) for index in range(samples)] \
                if dist.rank == 0 else None
            cell = dist.bcast(cell, root=0)
            hits = {label: 0.0 for label in engines}
            for method, engine in engines.items():
                requests = ((torch.as_tensor(s.context_ids), torch.as_tensor(s.query_ids),
                             engine.plan(len(s.context_ids), len(s.query_ids), new_tokens(task, max_new_tokens),
                                         question_tokens=s.question_tokens))
                            for s in cell)
                for answered, (index, gen) in enumerate(engine.generate_many(requests), start=1):
                    clock.tick()
                    if dist.rank == 0:
                        sample = cell[index]
                        output = tokenizer.decode(gen.tokens)
                        hit = score(output, sample.answers)
                        hits[method] += hit
                        rows.append({"task": task, "length": length, "sample": seed + index,
                                     "method": method, "score": hit, "output": output,
                                     "answers": list(sample.answers), "ttft_s": gen.metrics.ttft_s})
                    if answered < samples and clock.quiet_for() >= progress_every_s:
                        say(f"  {task} at {length} tokens, {method}: {answered} of {samples} samples "
                            f"({clock.left()})")
                        clock.spoke()
            done += samples
            say(f"[{done}/{total}{', ' + clock.left() if done < total else ''}] {task} at {length} tokens: " +
                ", ".join(f"{label} {hits[label] / samples:.2f}" for label in engines))
            clock.spoke()
            if dist.rank == 0:
                on_cell(rows)
        del engines
    return rows


class _Clock:
    """Time left at the rate measured so far (answers of different lengths cost differently,
    so it is a guess), and how long progress has been silent."""

    def __init__(self, answers: int) -> None:
        self.start = self.last_said = time.monotonic()
        self.answers, self.done = answers, 0

    def tick(self) -> None:
        self.done += 1

    def left(self) -> str:
        rate = (time.monotonic() - self.start) / max(self.done, 1)
        seconds = round(rate * (self.answers - self.done))
        return f"about {seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d} left"

    def quiet_for(self) -> float:
        return time.monotonic() - self.last_said

    def spoke(self) -> None:
        self.last_said = time.monotonic()


def finished_cells(rows: list[dict], tasks: list[str], lengths: list[int], samples: int,
                   methods: list[str], seed: int) -> set[tuple[str, int]]:
    """The (task, length) cells asked for that `rows` holds whole: every sample of the
    seeds asked for, scored by every method (named by label)."""
    wanted = {(seed + i, m) for i in range(samples) for m in methods}
    found: dict[tuple[str, int], set] = {}
    for r in rows:
        found.setdefault((r["task"], r["length"]), set()).add((r["sample"], r["method"]))
    return {(t, n) for t in tasks for n in lengths if wanted <= found.get((t, n), set())}


def summarise(rows: list[dict]) -> list[dict]:
    """Mean score per (task, length, method), and star's relative to dense on the same cell."""
    cells: dict[tuple, list[float]] = {}
    for r in rows:
        cells.setdefault((r["task"], r["length"], r["method"]), []).append(r["score"])
    summary = []
    for (task, length, method), scores in cells.items():
        entry = {"task": task, "length": length, "method": method, "samples": len(scores),
                 "accuracy": sum(scores) / len(scores)}
        dense = cells.get((task, length, "dense"))
        if dense is not None and method != "dense":
            base = sum(dense) / len(dense)
            entry["relative_to_dense"] = entry["accuracy"] / base if base > 0 else None
        summary.append(entry)
    return summary


def table(summary: list[dict]) -> str:
    """A line per (task, length): each method's accuracy, and star's relative to dense."""
    methods = list(dict.fromkeys(s["method"] for s in summary))
    lines: dict[tuple, dict] = {}
    for s in summary:
        text = f"{s['accuracy']:.2f}"
        if s.get("relative_to_dense") is not None:
            text += f" ({s['relative_to_dense'] * 100:.0f}%)"
        lines.setdefault((s["task"], s["length"]), {"task": s["task"], "length": s["length"]})[s["method"]] = text
    return text_table(list(lines.values()), ["task", "length", *methods], left={"task"})
