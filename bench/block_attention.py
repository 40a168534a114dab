"""How the query weighs each star block against how it weighs it under dense attention.

For each sample, in one process: the context's K/V as dense attention computes it and as
star's phase 1 does (block 0 alone, every other block after the anchor), then the query
over each. At every layer the query's last token gets, per head, the log-sum-exp of its
logits over each block's keys (and over the query's own): exp(lse_b) is the attention mass
block b draws, so softmax over b of lse_b is the share phase 2's merge gives it. Prints,
star against dense, the share of each block (mean over layers and heads), the mean lse of
each block relative to block 0's, the share the queried needle and the other needles get,
and, of the answers that missed, how many gave another needle's value and how many the
last needle's.

  python bench/block_attention.py --task niah_multikey_repeated --lengths 2K,4K --blocks 4 --samples 20 \
      --name block_attention_smollm2_cpu
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import Tensor

from star_engine.checkpoint import load_model
from star_engine.config import DEFAULT_MODEL
from star_engine.flags import token_counts
from star_engine.measure.tasks import make_sample, score
from star_engine.measure.text_table import text_table
from star_engine.model import Transformer
from star_engine.tokenizer import load_tokenizer

from results_io import save


def blocks_of(context_len: int, count: int) -> list[tuple[int, int]]:
    size = -(-context_len // count)
    return [(s, min(s + size, context_len)) for s in range(0, context_len, size)]


def attend_causal(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    group = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
    scores = (q @ k.transpose(1, 2)) / math.sqrt(q.shape[-1])
    tq, tk = q.shape[1], k.shape[1]
    visible = torch.arange(tk, device=q.device)[None, :] <= torch.arange(tq, device=q.device)[:, None] + (tk - tq)
    return torch.softmax(scores.masked_fill(~visible, float("-inf")), -1) @ v


def encode(model: Transformer, ids: Tensor, positions: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Every layer's K/V of `ids`, causally."""
    kv: list[tuple[Tensor, Tensor]] = []

    def attend(layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        kv.append((k, v))
        return attend_causal(q, k, v)
    device = model.embed.weight.device
    model(ids.to(device), positions.to(device), attend)
    return kv


def star_kv(model: Transformer, context: Tensor, blocks: list[tuple[int, int]]) -> list[tuple[Tensor, Tensor]]:
    """Phase 1 of star with anchor = block 0, all blocks in one process."""
    anchor = blocks[0][1]
    parts = []
    for b, (s, e) in enumerate(blocks):
        if b == 0:
            parts.append(encode(model, context[s:e], torch.arange(s, e)))
        else:
            ids = torch.cat((context[:anchor], context[s:e]))
            positions = torch.cat((torch.arange(anchor), torch.arange(s, e)))
            parts.append([(k[:, anchor:], v[:, anchor:]) for k, v in encode(model, ids, positions)])
    return [(torch.cat([p[layer][0] for p in parts], 1), torch.cat([p[layer][1] for p in parts], 1))
            for layer in range(len(parts[0]))]


def query_pass(model: Transformer, kv: list[tuple[Tensor, Tensor]], query: Tensor, context_len: int,
               ranges: list[tuple[int, int]], new_tokens: int) -> tuple[Tensor, list[int]]:
    """The query over the context's K/V: lse [layers, heads, ranges + 1] of the query's last
    token over each key range and over the query itself; then greedy tokens."""
    keys = [list(layer) for layer in kv]
    lse_rows: list[Tensor] = []

    def attend(layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        keys[layer][0] = torch.cat((keys[layer][0], k), 1)
        keys[layer][1] = torch.cat((keys[layer][1], v), 1)
        kk, vv = keys[layer]
        if record:
            group = q.shape[0] // kk.shape[0]
            logits = torch.einsum("hd,htd->ht", q[:, -1], kk.repeat_interleave(group, 0)) / math.sqrt(q.shape[-1])
            lse_rows.append(torch.stack([logits[:, s:e].logsumexp(-1) for s, e in ranges]
                                        + [logits[:, context_len:].logsumexp(-1)], -1))
        return attend_causal(q, kk, vv)

    device = model.embed.weight.device
    record = True
    hidden = model(query.to(device), torch.arange(context_len, context_len + len(query), device=device), attend)
    record = False
    tokens = [int(model.logits(hidden[-1:])[-1].argmax())]
    position = context_len + len(query)
    while len(tokens) < new_tokens:
        hidden = model(torch.tensor(tokens[-1:], device=device), torch.tensor([position], device=device), attend)
        tokens.append(int(model.logits(hidden)[-1].argmax()))
        position += 1
    return torch.stack(lse_rows).cpu(), tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--task", default="niah_multikey_repeated")
    parser.add_argument("--lengths", type=token_counts, default=token_counts("2K"))
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--name", required=True, help="bench/results/<name>.json")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model = load_model(args.model, torch.float32, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = load_tokenizer(args.model, tuple(model.config.eos_token_ids))
    rows = []
    for length in args.lengths:
        for seed in range(args.samples):
            sample = make_sample(args.task, tokenizer, length, seed)
            context, query = torch.tensor(sample.context_ids), torch.tensor(sample.query_ids)
            blocks = blocks_of(len(context), args.blocks)
            # The needles' token ranges: the queried one (its value is the answer) and the others.
            needle_ranges = [(start, start + len(tokenizer.encode(" " + text)))
                             for start, text in zip(sample.needle_starts, sample.needles)]
            queried = [i for i, text in enumerate(sample.needles) if any(a in text for a in sample.answers)]
            ranges = blocks + needle_ranges
            row = {"length": length, "sample": seed, "blocks": blocks, "needle_blocks":
                   [next(b for b, (s, e) in enumerate(blocks) if s <= start < e) for start, _ in needle_ranges],
                   "queried": queried}
            for method, kv in (("dense", encode(model, context, torch.arange(len(context)))),
                               ("star", star_kv(model, context, blocks))):
                lse, tokens = query_pass(model, kv, query, len(context), ranges, args.new_tokens)
                output = tokenizer.decode(tokens)
                values = [next((w for w in text.split() if w.rstrip(".").isdigit()), "").rstrip(".")
                          for text in sample.needles]
                row[method] = {"lse": lse.tolist(), "output": output, "score": score(output, sample.answers),
                               "gave_values_of": [i for i, value in enumerate(values) if value and value in output]}
            rows.append(row)
            print(f"{length} #{seed}: dense {row['dense']['score']:.0f} star {row['star']['score']:.0f} "
                  f"star gave needle {row['star']['gave_values_of']} (queried {queried}, needles in blocks "
                  f"{row['needle_blocks']})", flush=True)
    print(text_table(summarise(rows, args.blocks), ["length", "method", "what", *[f"b{b}" for b in range(args.blocks)],
                                                  "query", "queried_needle", "other_needles"]))
    print(text_table(wrong_answers(rows), ["length", "method", "samples", "missed", "gave_another_value",
                                           "gave_the_last_needles"]))
    summary, wrong = summarise(rows, args.blocks), wrong_answers(rows)
    # Saved per layer, averaged over heads: per head, 100 samples make a file of tens of MB.
    for row in rows:
        for method in ("dense", "star"):
            row[method]["lse"] = torch.tensor(row[method]["lse"]).mean(1).tolist()
    print("saved", save(args.name, rows, model=args.model, task=args.task, blocks_count=args.blocks,
                        lse="per sample and method: [layer][block..., needle..., the query's own] averaged over heads",
                        summary=summary, wrong_answers=wrong))


def summarise(rows: list[dict], count: int) -> list[dict]:
    """Per length and method: the share of the query's attention each block and the query
    draw, and the queried and the other needles (mean over samples, layers, heads); each
    block's lse relative to block 0's."""
    out = []
    for length in sorted({r["length"] for r in rows}):
        mine = [r for r in rows if r["length"] == length]
        for method in ("dense", "star"):
            shares, rel, needle_q, needle_o = [], [], [], []
            for r in mine:
                lse = torch.tensor(r[method]["lse"])  # [layers, heads, blocks + needles + 1]
                block_lse = torch.cat((lse[..., :count], lse[..., -1:]), -1)
                total = block_lse.logsumexp(-1, keepdim=True)
                shares.append((block_lse - total).exp().mean((0, 1)))
                rel.append((lse[..., :count] - lse[..., :1]).mean((0, 1)))
                needles = lse[..., count:-1]
                q = needles[..., r["queried"]].logsumexp(-1) - total[..., 0]
                others = [i for i in range(needles.shape[-1]) if i not in r["queried"]]
                needle_q.append(q.exp().mean())
                if others:
                    needle_o.append((needles[..., others].logsumexp(-1) - total[..., 0]).exp().mean())
            share = torch.stack(shares).mean(0)
            relative = torch.stack(rel).mean(0)
            out.append({"length": length, "method": method, "what": "share",
                        **{f"b{b}": f"{share[b]:.3f}" for b in range(count)}, "query": f"{share[-1]:.3f}",
                        "queried_needle": f"{torch.stack(needle_q).mean():.4f}",
                        "other_needles": f"{torch.stack(needle_o).mean():.4f}" if needle_o else ""})
            out.append({"length": length, "method": method, "what": "lse - lse(b0)",
                        **{f"b{b}": f"{relative[b]:+.2f}" for b in range(count)}, "query": "",
                        "queried_needle": "", "other_needles": ""})
    return out


def wrong_answers(rows: list[dict]) -> list[dict]:
    """Per length and method: the answers that missed, those that gave another needle's
    value instead, and of those the ones that gave the last needle's (the nearest the query)."""
    out = []
    for length in sorted({r["length"] for r in rows}):
        mine = [r for r in rows if r["length"] == length]
        for method in ("dense", "star"):
            missed = [r for r in mine if r[method]["score"] == 0]
            other = [r for r in missed if r[method]["gave_values_of"]]
            last = [r for r in other if len(r["needle_blocks"]) - 1 in r[method]["gave_values_of"]]
            out.append({"length": length, "method": method, "samples": len(mine), "missed": len(missed),
                        "gave_another_value": len(other), "gave_the_last_needles": len(last)})
    return out


if __name__ == "__main__":
    main()
