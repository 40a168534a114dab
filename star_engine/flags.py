"""The flags the commands share, defined once: what each means, its default, its check.

Star's layout has one set of flags in every command: --blocks (a count) or --block-size
(tokens), --anchor-tokens or --anchor-fraction (of a block), --layout, --anchor-mode.
bench, eval and plan take comma-separated lists of them, a grid; run and demo one value
each."""

from __future__ import annotations

import argparse
import itertools
from fractions import Fraction
from typing import TYPE_CHECKING, Callable

from .config import BUILTIN_MODELS, DEFAULT_MODEL, PRESETS
from .names import (ANCHOR_MODES, ATTENTION_BACKENDS, DEFAULT_ANCHOR_FRACTION, DEFAULT_ANCHOR_MODE,
                    DEFAULT_ANCHOR_QUERY, DEFAULT_STAR_LAYOUT, DEFAULT_WINDOW_FRACTION, DEFAULT_WINDOW_MODE, DTYPES,
                    PUBLISHED_WINDOW_MODE, STAR_LAYOUTS, STRATEGIES, WINDOW_MODES)
from .settings import KVCacheSettings, RuntimeSettings, ScaleOutSettings

if TYPE_CHECKING:
    from .attention.spec import StrategySpec


def positive(text: str) -> int:
    return _integer_from(text, 1)


def non_negative(text: str) -> int:
    return _integer_from(text, 0)


def _integer_from(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be >= {least}, got {value}")
    return value


def on_off(text: str) -> bool:
    if text.strip() not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")
    return text.strip() == "on"


def positive_seconds(text: str) -> float:
    return positive_number(text, "seconds")


def positive_number(text: str, what: str = "a number") -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def fraction(text: str) -> float:
    from .attention.spec import parse_fraction

    try:
        return parse_fraction(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def window_fraction(text: str) -> float:
    """A fraction of the block, or 0: no window."""
    return 0.0 if text.strip() in ("0", "0.0") else fraction(text)


def share(text: str) -> float:
    """A share in [0, 1]: 0, 1/10, 0.1, 1."""
    return 0.0 if text.strip() in ("0", "0.0", "off") else fraction(text)


def counts_list(text: str) -> list[int]:
    """'12,3,1' -> [12, 3, 1]: numbers >= 1."""
    return [positive(t.strip()) for t in text.split(",") if t.strip()]


def parse_tokens(text: str) -> int:
    """'32K' -> 32768, '1M' -> 1048576, '5000' -> 5000."""
    scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:].upper(), 1)
    return int(text[:-1] if scale > 1 else text) * scale


def token_counts(text: str, flag: str = "--lengths") -> list[int]:
    """'32K,64K,1M' -> [32768, 65536, 1048576] (K = 1024)."""
    try:
        counts = [parse_tokens(t.strip()) for t in text.split(",") if t.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise ValueError(f"{flag} {text!r}: expected token counts such as 32K,64K,1M")
    return counts


def layout_name(text: str) -> str:
    if text not in STAR_LAYOUTS:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(STAR_LAYOUTS)}, got {text!r}")
    return text


def window_mode_name(text: str) -> str:
    if text not in WINDOW_MODES:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(WINDOW_MODES)}, got {text!r}")
    return text


def strategy_names(text: str) -> list[str]:
    """'star,ring' -> ['star', 'ring']."""
    names = [a.strip() for a in text.split(",") if a.strip()]
    unknown = [a for a in names if a not in STRATEGIES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown strategies {unknown}; expected some of {', '.join(STRATEGIES)}")
    return list(dict.fromkeys(names))


def add_model_flags(parser: argparse.ArgumentParser, model: str = DEFAULT_MODEL, tensor_parallel: bool = True) -> None:
    """The model and how it runs; with tensor_parallel also --tp, for commands that split it."""
    models = ", ".join([*BUILTIN_MODELS, *PRESETS])
    parser.add_argument("--model", default=model,
                        help=f"built-in model or shape preset ({models}), a Hugging Face checkpoint "
                             f"directory (config.json + *.safetensors) or a .gguf file (default: {model})")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="weights and activations (default: float32 on cpu, bfloat16 on cuda)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="one GPU per rank, or CPU tensors (default: cuda when available)")
    if tensor_parallel:
        parser.add_argument("--tp", type=positive, default=1, metavar="N",
                            help="tensor parallelism: hosts of N consecutive ranks of one node split the model "
                                 "(heads, MLP, vocabulary) and hold one copy of it together; the strategy runs "
                                 "across hosts (default: 1, every rank holds the whole model)")
    else:
        parser.set_defaults(tp=1)  # every rank holds the whole model
    parser.add_argument("--no-cuda-graph", action="store_true",
                        help="decode eagerly instead of replaying each step from a CUDA graph")
    parser.add_argument("--attn-backend", choices=ATTENTION_BACKENDS, default="auto",
                        help="kernels of prefill and the query pass: cudnn, flash-attn (if installed) or "
                             "PyTorch's flash kernel on GPUs, torch (exact float32 where the log-sum-exp is "
                             "needed) on CPUs and for float32 (default: auto, the first of these that works)")


def add_star_flags(parser: argparse.ArgumentParser, grid: bool = False, blocks: int | None = None,
                   layouts: tuple[str, ...] = (DEFAULT_STAR_LAYOUT,)) -> None:
    """Star's layout. With grid, each flag takes a comma-separated list, and the default
    `layouts` may be several; `blocks` is the default number of blocks (None: one per rank)."""
    def kind(parse: Callable[[str], object]) -> Callable[[str], object]:
        return (lambda text: [parse(t) for t in text.split(",") if t.strip()]) if grid else parse

    each = "; comma-separated for a grid" if grid else ""
    group = parser.add_argument_group("star's layout (other strategies ignore it)")
    size = group.add_mutually_exclusive_group()
    size.add_argument("--blocks", type=kind(positive), default=[blocks] if grid and blocks else blocks, metavar="N",
                      help=f"cut the context into N blocks of equal size{each} "
                           f"(default: {blocks or 'one per rank'})")
    size.add_argument("--block-size", type=kind(positive), default=None, metavar="TOKENS",
                      help=f"or into blocks of TOKENS tokens, the last one shorter{each}")
    anchor = group.add_mutually_exclusive_group()
    anchor.add_argument("--anchor-tokens", type=kind(positive), default=None, metavar="TOKENS",
                        help=f"the anchor: the first TOKENS tokens of the context, which every block but the first "
                             f"is encoded after{each}")
    anchor.add_argument("--anchor-fraction", type=kind(fraction), default=None, metavar="F",
                        help=f"or the anchor as a fraction of a block: 1/4, 0.5, 1 (a whole block: star as "
                             f"published){each} (default: {Fraction(DEFAULT_ANCHOR_FRACTION)})")
    group.add_argument("--layout", type=kind(layout_name), default=list(layouts) if grid else layouts[0],
                       metavar="uniform|balanced",
                       help="blocks of equal size, or block 0 longer so that every block (and rank) has the "
                            f"same work, weighed by the device's measured rates{each} (default: {','.join(layouts)})")
    window = group.add_mutually_exclusive_group()
    window.add_argument("--window-tokens", type=kind(non_negative), default=None, metavar="TOKENS",
                        help="each block but the first is encoded after the anchor and then the TOKENS context "
                             f"tokens just before it, its local window (0: none){each}")
    window.add_argument("--window-fraction", type=kind(window_fraction), default=None, metavar="F",
                        help=f"or that window as a fraction of a block: 1/4, 0.5, 1 (0: none){each} "
                             f"(default: {Fraction(DEFAULT_WINDOW_FRACTION)})")
    group.add_argument("--window-mode", type=kind(window_mode_name), default=None, metavar="encode|pass",
                       help="the window's tokens are encoded again before each block, or their K/V, as the "
                            "previous block's encoding computed it, is passed on (a message a layer between "
                            f"neighbouring ranks, no per-token work; the window then reaches back at most to the "
                            f"previous block's start){each} (default: {DEFAULT_WINDOW_MODE})")
    group.add_argument("--anchor-query", type=kind(on_off), default=[DEFAULT_ANCHOR_QUERY] if grid
                       else DEFAULT_ANCHOR_QUERY, metavar="on|off",
                       help="each block but the first is encoded after the anchor and the request's question (the "
                            "query without the chat template's tail), so that it knows what is asked; a context "
                            f"that several requests ask about is encoded once without any question; off: without "
                            f"it{each} (default: {'on' if DEFAULT_ANCHOR_QUERY else 'off'})")
    group.add_argument("--block-temperature", type=kind(positive_number), default=[1.0] if grid else 1.0,
                       metavar="T",
                       help="phase 2 attends the blocks encoded after the anchor at temperature T (their logits "
                            f"divided by T), block 0 and the tokens after the context at 1{each} (default: 1)")
    group.add_argument("--recompute-fraction", type=kind(share), default=[0.0] if grid else 0.0, metavar="R",
                       help="after phase 1, the K/V of the share R of the tokens outside block 0 that it got most "
                            "wrong is recomputed over the whole context (selective recompute: R of the per-token "
                            f"work, and one exact layer to choose them){each} (default: 0, off)")
    group.add_argument("--anchor-mode", choices=ANCHOR_MODES, default=DEFAULT_ANCHOR_MODE,
                       help="the anchor's K/V is computed once and broadcast layer by layer, or recomputed "
                            f"by every rank that needs it (default: {DEFAULT_ANCHOR_MODE})")
    parser.set_defaults(star_grid=grid)


def star_specs(args: argparse.Namespace, strategies: list[str]) -> list[StrategySpec]:
    """The specs of the strategies asked for, star's from the layout flags (every
    combination of them with a grid); an anchor or window the flags leave out is the
    commands' default. Raises ValueError naming the flag."""
    from .attention.spec import StrategySpec

    def values(given: object) -> list:  # a grid's flag holds a list, the others one value
        return [None] if given is None else given if args.star_grid else [given]

    size_key = "block_size" if args.block_size is not None else "blocks"
    anchor_key = "anchor_tokens" if args.anchor_tokens is not None else "anchor_fraction"
    anchor = getattr(args, anchor_key)
    anchors = [DEFAULT_ANCHOR_FRACTION] if anchor is None else values(anchor)
    window_key = "window_tokens" if args.window_tokens is not None else "window_fraction"
    window = getattr(args, window_key)
    windows = [DEFAULT_WINDOW_FRACTION] if window is None else values(window)
    grid = list(itertools.product(values(getattr(args, size_key)), anchors, values(args.layout), windows,
                                  values(args.anchor_query), values(args.block_temperature),
                                  values(args.recompute_fraction), values(args.window_mode)))
    specs = []
    for attn in strategies:
        if attn != "star":
            specs.append(StrategySpec(attn))
            continue
        for size, anchor, layout, window, query, temperature, recompute, window_mode in grid:
            if not window:
                if args.star_grid and window_mode not in (None, PUBLISHED_WINDOW_MODE):
                    continue  # a mode says how a window travels: without one, the grid's other row is this row
                window = 0 if window_key == "window_tokens" else None
            try:
                specs.append(StrategySpec("star", anchor_mode=args.anchor_mode, layout=layout, anchor_query=query,
                                          block_temperature=temperature, recompute_fraction=recompute,
                                          window_mode=window_mode or (DEFAULT_WINDOW_MODE if window
                                                                      else PUBLISHED_WINDOW_MODE),
                                          **{size_key: size, anchor_key: anchor, window_key: window}))
            except ValueError as exc:
                raise ValueError(f"star's layout: {exc} (--blocks/--block-size, --anchor-tokens/--anchor-fraction, "
                                 "--window-tokens/--window-fraction, --window-mode)") from None
    return specs


def add_lengths_flag(parser: argparse.ArgumentParser, default: str, of: str = "context") -> None:
    """--lengths, which the command turns into a list with token_counts."""
    parser.add_argument("--lengths", default=default,
                        help=f"{of} lengths in tokens, comma-separated, K = 1024 (default: {default})")


def add_query_tokens_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--query-tokens", type=positive, default=64, metavar="TOKENS",
                        help="tokens of the query after the context (default: 64)")


def add_generation_flags(parser: argparse.ArgumentParser, max_new_tokens: int | None, sized: bool = True,
                         meaning: str = "tokens to generate at most") -> None:
    """--max-new-tokens, with the command's meaning of it and its default (None: none, the
    meaning says what then); with sized also the KV cache's size."""
    parser.add_argument("--max-new-tokens", type=positive, default=max_new_tokens, metavar="N",
                        help=meaning if max_new_tokens is None else f"{meaning} (default: {max_new_tokens})")
    if sized:
        parser.add_argument("--max-tokens", type=positive, default=None,
                            help="longest request (context + query + generated tokens) the KV cache is "
                                 "sized for; longer ones are refused (default: the model's context length)")
        parser.add_argument("--beyond-trained-positions", action="store_true",
                            help="allow --max-tokens beyond the positions the model was trained for (with a "
                                 "warning): its answers there cannot be trusted")


def runtime_settings(args: argparse.Namespace) -> RuntimeSettings:
    """What the model flags ask for; ValueError where --model names nothing the engine reads."""
    from .model_source import read_config, resolve

    source = resolve(args.model)
    if source.kind == "hf":
        read_config(source.path / "config.json")
    return RuntimeSettings(args.model, args.dtype, args.device, args.tp, args.attn_backend, not args.no_cuda_graph)


def kv_cache_settings(args: argparse.Namespace, batch: int = 1) -> KVCacheSettings:
    """What the generation flags size a KV cache for, `batch` requests at once."""
    return KVCacheSettings(args.max_tokens, batch, beyond_trained_positions=args.beyond_trained_positions)


def hosts_per_request(text: str) -> str:
    """'auto', 'all' or a number of hosts >= 1."""
    if text in ("auto", "all") or (text.isdigit() and int(text) >= 1):
        return text
    raise argparse.ArgumentTypeError(f"expected auto, all or a number of hosts, got {text!r}")


def add_scale_out_flags(parser: argparse.ArgumentParser, default: str, several: bool = False) -> None:
    """How many hosts each request runs on; with several, a comma-separated list of ways."""
    kind = (lambda text: [hosts_per_request(t.strip()) for t in text.split(",") if t.strip()]) if several \
        else hosts_per_request
    each = "; comma-separated to compare" if several else ""
    parser.add_argument("--hosts-per-request", type=kind, default=kind(default),
                        metavar="auto|all|N",
                        help="hosts a request runs on (a host: one rank, or --tp ranks): all of them; N of them "
                             "(1, 2, 4, ... or all); or auto: the fewest whose blocks hold at most --max-block "
                             f"tokens of the context, requests of different sizes on different hosts at once{each} "
                             f"(default: {default})")
    parser.add_argument("--max-block", type=parse_tokens, default=None, metavar="TOKENS",
                        help="with --hosts-per-request auto: the most context tokens a host takes; K = 1024 "
                             "(default: 32K, 16K for models of 30B parameters or more)")


def scale_out_settings(args: argparse.Namespace) -> list[ScaleOutSettings]:
    """What the scale-out flags ask for (a way each, where the flag takes several);
    ValueError where they contradict star's flags."""
    ways = args.hosts_per_request if isinstance(args.hosts_per_request, list) else [args.hosts_per_request]
    auto = "auto" in ways
    if args.max_block is not None and not auto:
        raise ValueError("--max-block takes effect only with --hosts-per-request auto")
    blocks = [getattr(args, flag) for flag in ("blocks", "block_size")]
    if auto and any(b is not None and b != [None] for b in blocks):
        raise ValueError("--blocks and --block-size fix star's blocks, while with --hosts-per-request auto a "
                         "request's hosts (and so its blocks) follow from --max-block: to fix the blocks, run every "
                         "request on every host (--hosts-per-request all)")
    target = getattr(args, "ttft_target", None)  # run's
    if target is not None and not auto:
        raise ValueError("--ttft-target takes effect only with --hosts-per-request auto")
    if target is not None and args.max_block is not None:
        raise ValueError("give --ttft-target or --max-block, not both: each sets how many hosts a request gets")
    return [ScaleOutSettings(way, args.max_block if way == "auto" else None, target if way == "auto" else None)
            for way in ways]
