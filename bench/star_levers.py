"""Star's accuracy levers against star as published and against dense, and what each costs.

Reads evaluations (eval's JSON: dense, star as published, and star with levers, answering
the same samples) and benchmarks (bench's JSON: the same star variants and ring on the
Llama-3.1-8B shape). For each star variant, over every task and length the evaluations
hold: its accuracy as a share of dense's; the share of star's gap to dense it closes (the
gap of star as published with as many blocks); the exact sign test, sample by sample,
against star as published, and against the default star (published with the question);
the same for variable tracking alone; and, at one context length, its phase-1 time against
star as published and the default and its time to first token against ring's, each ratio
within one benchmark run (the first given that measured the variant). Writes the table as
JSON and a plot of accuracy against time to first token.

  python bench/star_levers.py --eval E.json [...] --bench B.json [...] --context 128K --name star_levers_smollm2_h200
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from star_engine.flags import token_counts
from star_engine.measure.levers import against, against_published, blocks_of, published, with_question
from star_engine.measure.plots import pyplot
from star_engine.measure.text_table import text_table

from results_io import RESULTS, save

def costs(benches: list[dict], context: int) -> list[dict[str, dict]]:
    """Per benchmark run, per label at `context`: phase-1 time and time to first token."""
    return [{row["label"]: {"phase1_s": row["phase1_s"], "ttft_s": row["ttft_s"], "device": bench["device"]}
             for row in bench["rows"] if row["context"] == context and "phase1_s" in row} for bench in benches]


def cost_ratios(runs: list[dict[str, dict]], method: str) -> dict:
    """The method's phase 1 and first token, and their ratios to star as published, the
    default star and ring measured in the same run: the first run that measured the method."""
    run = next((r for r in runs if method in r), None)
    if run is None:
        return {}
    cost = run[method]
    found = {"phase1_s": cost["phase1_s"], "ttft_s": cost["ttft_s"], "cost_device": cost["device"]}
    for key, base in (("published", published(method)), ("default", with_question(method))):
        if base in run:
            found[f"phase1_against_{key}"] = cost["phase1_s"] / run[base]["phase1_s"]
    if "ring" in run:
        found["ttft_against_ring"] = cost["ttft_s"] / run["ring"]["ttft_s"]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--eval", type=Path, nargs="+", required=True)
    parser.add_argument("--bench", type=Path, nargs="*", default=[])
    parser.add_argument("--context", type=token_counts, default=token_counts("128K"),
                        help="the benchmark's context length the costs are read at")
    parser.add_argument("--name", required=True, help="bench/results/<name>.json and .png")
    args = parser.parse_args()
    evals = [json.loads(p.read_text()) for p in args.eval]
    benches = [json.loads(p.read_text()) for p in args.bench]
    context = args.context[0]
    runs = costs(benches, context)
    labels = {r["method"] for e in evals for r in e["rows"]}
    methods = sorted({m for m in labels if m.startswith("star")},
                     key=lambda m: (blocks_of(m) or 0, m != published(m), m != with_question(m), m))
    rows = []
    for method in methods:
        row = {"method": method, "blocks": blocks_of(method), **against_published(evals, method)}
        vt = against_published(evals, method, {"vt"})
        row.update(vt_accuracy=vt["accuracy"], vt_dense=vt["dense"], vt_published=vt["published"],
                   vt_gap_closed=vt["gap_closed"], vt_p_against_published=vt["p_against_published"])
        default = with_question(method)
        if method not in (default, published(method)) and default in labels:
            versus = against(evals, method, default)
            row.update(default=default, higher_than_default=versus["higher"], lower_than_default=versus["lower"],
                       p_against_default=versus["p"])
        row.update(cost_ratios(runs, method))
        rows.append(row)

    def shown(value, form: str) -> str:
        return "-" if value is None else format(value, form)
    print(text_table([{"method": r["method"], "samples": r["samples"], "accuracy": shown(r["accuracy"], ".3f"),
                       "of dense": shown(r["share_of_dense"], ".1%"), "gap closed": shown(r["gap_closed"], ".0%"),
                       "+/- published": f"{r['higher_than_published']}/{r['lower_than_published']}",
                       "p": shown(r["p_against_published"], ".2g"),
                       "+/- default": f"{r['higher_than_default']}/{r['lower_than_default']}" if "default" in r else "-",
                       "p default": shown(r.get("p_against_default"), ".2g"), "vt": shown(r["vt_accuracy"], ".3f"),
                       "vt gap closed": shown(r["vt_gap_closed"], ".0%"),
                       "phase 1 x": shown(r.get("phase1_against_published"), ".3f"),
                       "x default": shown(r.get("phase1_against_default"), ".3f"),
                       "ttft / ring": shown(r.get("ttft_against_ring"), ".3f")} for r in rows],
                     ["method", "samples", "accuracy", "of dense", "gap closed", "+/- published", "p", "+/- default",
                      "p default", "vt", "vt gap closed", "phase 1 x", "x default", "ttft / ring"], left={"method"}))
    path = save(args.name, rows, evals=[str(p) for p in args.eval], benches=[str(p) for p in args.bench],
                cost_context=context)
    print("saved", path)
    if plot(rows, context, RESULTS / f"{args.name}.png"):
        print("plotted", RESULTS / f"{args.name}.png")


def plot(rows: list[dict], context: int, path: Path) -> bool:
    """Accuracy (share of dense) against time to first token (relative to ring), a point per
    star variant; ring and dense (exact) at accuracy 1."""
    plt = pyplot()
    placed = [r for r in rows if r.get("ttft_against_ring") is not None and r["share_of_dense"] is not None]
    if plt is None or not placed:
        return False
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for blocks, marker in ((4, "o"), (8, "s")):
        mine = [r for r in placed if r["blocks"] == blocks]
        ax.scatter([r["ttft_against_ring"] for r in mine], [r["share_of_dense"] for r in mine], marker=marker,
                   label=f"star, {blocks} blocks")
        # Labels alternate above and below, so that variants close in time stay readable.
        for i, r in enumerate(sorted(mine, key=lambda r: r["ttft_against_ring"])):
            ax.annotate(r["method"].replace("star ", ""), (r["ttft_against_ring"], r["share_of_dense"]),
                        fontsize=7, xytext=(4, 3 if i % 2 else -9), textcoords="offset points")
    ax.scatter([1.0], [1.0], marker="*", s=120, color="black", label="ring = dense (exact)")
    unplaced = [r for r in rows if r not in placed and r["share_of_dense"] is not None]
    unplaced_line = "".join(f"\nnot placed, no time measured: {r['method'].replace('star ', '')}, "
                            f"{r['share_of_dense']:.1%} of dense" for r in unplaced)
    ax.set_xlabel(f"time to first token relative to ring, {context // 1024}K tokens, Llama-3.1-8B shape\n"
                  "(where measured on one GPU: every block's work against ring's, which is dense's)" + unplaced_line)
    ax.set_ylabel("accuracy as a share of dense")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


if __name__ == "__main__":
    main()
