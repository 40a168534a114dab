"""Independent references the engine is checked against: naive float64 attention, and
Star Attention emulated with Hugging Face transformers' own Llama code."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor


def naive_attention(q: Tensor, k: Tensor, v: Tensor, visible: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """float64 softmax attention, q [H, Tq, D] over k, v [KV, Tk, D]; visible [Tq, Tk] masks keys.
    Returns o [H, Tq, D] and lse [H, Tq] (float64)."""
    group = q.shape[0] // k.shape[0]
    k = k.double().repeat_interleave(group, 0)
    v = v.double().repeat_interleave(group, 0)
    scores = q.double() @ k.transpose(1, 2) / math.sqrt(q.shape[-1])
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.nan_to_num(torch.exp(scores - lse[..., None]))
    return probs @ v, lse


def causal_visible(tq: int, tk: int) -> Tensor:
    """Bottom-right aligned causal visibility: query i sees keys 0 .. tk - tq + i."""
    return torch.arange(tk)[None, :] <= torch.arange(tq)[:, None] + (tk - tq)


def make_tiny_checkpoint(path: Path, model_type: str = "llama", seed: int = 0, **overrides) -> Path:
    """A random tiny Llama/Qwen2/Mistral saved in Hugging Face layout."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                  bos_token_id=None, eos_token_id=None, pad_token_id=None, tie_word_embeddings=False)
    fields.update(overrides)
    config = AutoConfig.for_model(model_type, **fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norms of ones hide mistakes in their handling
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    return path


def uniform_blocks(context_len: int, block_size: int) -> list[tuple[int, int]]:
    """[start, end) of blocks of block_size tokens, the last one shorter."""
    return [(s, min(s + block_size, context_len)) for s in range(0, context_len, block_size)]


def star_reference_logits(checkpoint: Path, context: Tensor, query: Tensor, generated: list[int],
                          blocks: list[tuple[int, int]], anchor_size: int, window: int = 0,
                          query_first: bool = False, temperature: float = 1.0,
                          passed_window: int = 0) -> list[Tensor]:
    """Star Attention through transformers, in one process: each block's K/V computed from
    [anchor ; block] (anchor at positions 0.., block at its own), block 0 alone; then the query
    and the generated tokens (teacher-forced) attend to all of it. Returns the logits of each
    forward pass: [query tokens, vocab], then [1, vocab] per generated token but the last.
    query_first: before the anchor, the query at the positions just before 0 (the anchor's
    K/V computed without it); window: between the anchor and a block, the `window` context
    tokens before the block past the anchor, at their positions; passed_window: after the
    anchor, the K/V of the previous block's last `passed_window` tokens (past the anchor) as
    that block's own encoding computed it;
    temperature: the keys of every block but block 0 divided by it once encoded."""
    from transformers import AutoModelForCausalLM, DynamicCache

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    n_layers = model.config.num_hidden_layers
    keys: list[list[Tensor]] = [[] for _ in range(n_layers)]
    values: list[list[Tensor]] = [[] for _ in range(n_layers)]
    anchor = context[:anchor_size]
    previous: tuple[int, list[Tensor], list[Tensor]] | None = None  # a block's start and K/V as computed
    with torch.no_grad():
        for start, end in blocks:
            block = context[start:end]
            cache = DynamicCache()
            skip = 0
            if start > 0:  # the anchor first, through the cache: transformers then masks causally
                question = query if query_first else query[:0]
                if len(question):  # before the anchor, each encoded alone
                    model(question[None], position_ids=torch.arange(-len(question), 0)[None], past_key_values=cache)
                    alone = DynamicCache()
                    model(anchor[None], position_ids=torch.arange(len(anchor))[None], past_key_values=alone)
                    for layer in range(n_layers):
                        cache.layers[layer].keys = torch.cat((cache.layers[layer].keys, alone.layers[layer].keys), 2)
                        cache.layers[layer].values = torch.cat((cache.layers[layer].values,
                                                                alone.layers[layer].values), 2)
                else:
                    model(anchor[None], position_ids=torch.arange(len(anchor))[None], past_key_values=cache)
                first = max(anchor_size, start - window)
                if first < start:
                    model(context[first:start][None], position_ids=torch.arange(first, start)[None],
                          past_key_values=cache)
                skip = len(question) + len(anchor) + start - first
                if passed_window:
                    before, before_keys, before_values = previous
                    lo, hi = max(anchor_size, before, start - passed_window) - before, start - before
                    for layer in range(n_layers):
                        cache.layers[layer].keys = torch.cat((cache.layers[layer].keys,
                                                              before_keys[layer][:, :, lo:hi]), 2)
                        cache.layers[layer].values = torch.cat((cache.layers[layer].values,
                                                                before_values[layer][:, :, lo:hi]), 2)
                    skip += hi - lo
            model(block[None], position_ids=torch.arange(start, start + len(block))[None], past_key_values=cache)
            previous = (start, [cache.layers[layer].keys[:, :, skip:] for layer in range(n_layers)],
                        [cache.layers[layer].values[:, :, skip:] for layer in range(n_layers)])
            for layer in range(n_layers):
                keys[layer].append(previous[1][layer] / (temperature if start > 0 else 1.0))
                values[layer].append(previous[2][layer])
        cache = DynamicCache()
        for layer in range(n_layers):
            cache.update(torch.cat(keys[layer], dim=2), torch.cat(values[layer], dim=2), layer)
        logits = []
        ids, position = query, len(context)
        for token in [None, *generated[:-1]]:
            if token is not None:
                ids = torch.tensor([token])
            out = model(ids[None], position_ids=torch.arange(position, position + len(ids))[None],
                        past_key_values=cache)
            logits.append(out.logits[0].float())
            position += len(ids)
    return logits


def causal_attention(layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """An `attend` for a model pass over a whole sequence at once: plain causal attention,
    grouped-query heads expanded."""
    group = q.shape[0] // k.shape[0]
    return torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(group, 0), v.repeat_interleave(group, 0), is_causal=True)
