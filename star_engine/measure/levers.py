"""Star variants (the levers of attention/star.py) against star as published and against
dense, over the samples of evaluations that all of them answered."""

from __future__ import annotations

import re

from .paired_methods import paired

_LEVER_PARTS = re.compile(r" (p?w=\S+|\+q|T=\S+|r=\S+)")


def published(label: str) -> str:
    """The label of star as published with the same blocks and layout: anchor = a block,
    no window, no query, no temperature."""
    return re.sub(r" a=\S+", " a=1", _LEVER_PARTS.sub("", label))


def with_question(label: str) -> str:
    """The label of the default star with the same blocks and layout: star as published
    with the question in phase 1 (`--anchor-query on`)."""
    return published(label) + " +q"


def against(evals: list[dict], method: str, base: str) -> dict:
    """The samples on which the method scores higher and lower than `base`, and the exact
    sign test, over every sample both answered."""
    overall = paired(evals, method, base)[-1]
    return {"samples": overall["samples"], "higher": overall["a_higher"], "lower": overall["b_higher"],
            "p": overall["p_value"]}


def blocks_of(label: str) -> int | None:
    found = re.search(r" (\d+)b\b", label)
    return int(found.group(1)) if found else None


def against_published(evals: list[dict], method: str, tasks: set[str] | None = None) -> dict:
    """Mean scores of the method, of dense and of star as published over the samples (of
    `tasks`, or all) that each pair answered; the share of dense's accuracy; the share of
    published star's gap to dense the method closes; the exact sign test against published
    star and the samples it scores higher and lower than dense. Only the samples the method
    answered count, for all three, so that a grid cut short is judged on what it holds."""
    answered = {(r["task"], r["length"], r["sample"]) for e in evals for r in e["rows"] if r["method"] == method}
    chosen = [{**e, "rows": [r for r in e["rows"] if (tasks is None or r["task"] in tasks)
                             and (r["task"], r["length"], r["sample"]) in answered]} for e in evals]
    base = published(method)
    versus_base = paired(chosen, method, base)[-1]
    versus_dense = paired(chosen, method, "dense")[-1]
    base_dense = paired(chosen, base, "dense")[-1]
    mean, dense, star = versus_dense["mean_a"], versus_dense["mean_b"], base_dense["mean_a"]
    closed = None if None in (mean, dense, star) or dense == star else (mean - star) / (dense - star)
    return {"samples": versus_base["samples"], "accuracy": mean, "dense": dense, "published": star,
            "share_of_dense": mean / dense if mean is not None and dense else None, "gap_closed": closed,
            "higher_than_published": versus_base["a_higher"], "lower_than_published": versus_base["b_higher"],
            "p_against_published": versus_base["p_value"],
            "higher_than_dense": versus_dense["a_higher"], "lower_than_dense": versus_dense["b_higher"]}
