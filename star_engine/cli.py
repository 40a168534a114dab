"""Command line: `python -m star_engine {run,demo,bench,eval}`, one process per rank under mpirun/srun.

Rank 0 reads the requests, tokenizes them, writes the results and shows progress; every
rank holds the model and takes part in each request.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch

from .attention.local import BACKENDS, backend_for, set_backend
from .checkpoint import BUILTIN_MODELS, DEFAULT_MODEL, resolve
from .model import PRESETS

if TYPE_CHECKING:
    from .launch import GracefulStop

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _anchor_size(text: str) -> int | float:
    """Tokens (an integer) or a fraction of the block (1/4, 0.5, block)."""
    if text.strip().isdigit():
        return _positive(text)
    from .evaluation import parse_anchor

    try:
        return parse_anchor(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _model_flags(parser: argparse.ArgumentParser, model: str = DEFAULT_MODEL) -> None:
    models = ", ".join([*BUILTIN_MODELS, *PRESETS])
    parser.add_argument("--model", default=model,
                        help=f"built-in model or shape preset ({models}), a Hugging Face checkpoint "
                             f"directory (config.json + *.safetensors) or a .gguf file (default: {model})")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="weights and activations (default: float32 on cpu, bfloat16 on cuda)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="one GPU per rank, or CPU tensors (default: cuda when available)")
    parser.add_argument("--no-cuda-graph", action="store_true",
                        help="decode eagerly instead of replaying each step from a CUDA graph")
    parser.add_argument("--attn-backend", choices=BACKENDS, default="auto",
                        help="kernels of prefill and the query pass: cudnn, flash-attn (if installed) or "
                             "PyTorch's flash kernel on GPUs, torch (exact float32 where the log-sum-exp is "
                             "needed) on CPUs and for float32 (default: auto, the first of these that works)")


def _star_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--block-size", type=_positive, default=None,
                        help="star: context tokens per block (default: the context divided by the ranks)")
    parser.add_argument("--anchor-size", type=_anchor_size, default=None,
                        help="star: the anchor, the start of block 0: tokens (4096), or a fraction of the "
                             "block (1/4, 0.5, block) (default: the block)")
    parser.add_argument("--anchor-mode", choices=("broadcast", "recompute"), default="broadcast",
                        help="star: the anchor's K/V is computed once and broadcast layer by layer, "
                             "or recomputed by every rank that needs it (default: broadcast)")


def _generation_flags(parser: argparse.ArgumentParser, max_new_tokens: int, sized: bool = True) -> None:
    parser.add_argument("--max-new-tokens", type=_positive, default=max_new_tokens,
                        help=f"tokens to generate at most, unless a request says otherwise "
                             f"(default: {max_new_tokens})")
    if sized:
        parser.add_argument("--max-tokens", type=_positive, default=None,
                            help="longest request (context + query + generated tokens) the KV cache is "
                                 "sized for; longer ones are refused (default: the model's context length)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m star_engine",
        description="Long-context LLM inference over many ranks with Star Attention, beside the "
                    "dense baseline. Launch one process per GPU: mpirun -np N python -m star_engine ...")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{run,demo,bench,eval}")

    run = commands.add_parser(
        "run", help="answer the requests of a JSONL file",
        description='Reads JSONL requests {"id", "context", "query", "max_new_tokens"?} and appends one '
                    'result line per request: {"id", "output", "output_tokens", "context_tokens", '
                    '"metrics": {"phase1_s", "ttft_s", "tpot_s", "peak_mem_bytes": [per rank]}, "error"}. '
                    "A bad request gets a line with its error and the run goes on. Ids already answered "
                    "in the output file are skipped, so an interrupted run can be started again.")
    run.add_argument("--input", required=True, type=Path, help="requests, one JSON object per line")
    run.add_argument("--output", required=True, type=Path, help="results, appended one JSON object per line")
    run.add_argument("--attn", choices=("star", "ring", "dense"), default="star",
                     help="star: blocks over all ranks, approximate; ring: exact, K/V passed around the "
                          "ranks; dense: the whole context on one rank (default: star)")
    _model_flags(run)
    _star_flags(run)
    _generation_flags(run, max_new_tokens=64)

    demo = commands.add_parser(
        "demo", help="a long document with a hidden fact: star's answer beside dense's",
        description="Builds a needle-in-a-haystack document, answers its question with star "
                    "attention over all ranks and with dense attention, and prints both answers "
                    "with their timings.")
    demo.add_argument("--context-tokens", type=_positive, default=3000,
                      help="length of the prompt, document and question, in tokens (default: 3000)")
    demo.add_argument("--seed", type=int, default=0, help="which document (default: 0)")
    _model_flags(demo)
    _star_flags(demo)
    _generation_flags(demo, max_new_tokens=12)

    bench = commands.add_parser(
        "bench", help="star against ring and dense: latency and memory over context lengths",
        description="Runs each strategy at each context length on the ranks it is launched with "
                    "(random token ids; lengths that do not fit in memory are skipped), prints a "
                    "table, and writes JSON and a PNG plot.")
    bench.add_argument("--attn", default="star,ring,dense", help="strategies, comma-separated (default: all)")
    bench.add_argument("--lengths", default="32K,64K,128K,256K,512K,1M",
                       help="context lengths in tokens, K = 1024 (default: 32K,64K,128K,256K,512K,1M)")
    bench.add_argument("--query-tokens", type=_positive, default=64, help="query tokens (default: 64)")
    bench.add_argument("--output", type=Path, default=None,
                       help="JSON results (default: e2e_<model>_<ranks>ranks.json in the current directory); "
                            "the plot goes beside it as .png")
    bench.add_argument("--replot", type=Path, default=None, metavar="JSON",
                       help="only draw the plot of an earlier result (e.g. made where matplotlib is missing)")
    _model_flags(bench, model="llama-3.1-8b")
    _star_flags(bench)
    _generation_flags(bench, max_new_tokens=32, sized=False)

    from .tasks import TASKS

    evaluate = commands.add_parser(
        "eval", help="accuracy of star against dense on synthetic long-context tasks",
        description="Generates RULER-style tasks from the seed at exactly the lengths asked for (in the "
                    "model's tokens and chat template), has every method answer the same samples, "
                    "scores them, prints a table (star's accuracy also relative to dense) and writes "
                    "JSON and a plot.")
    evaluate.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated (default: all: {', '.join(TASKS)})")
    evaluate.add_argument("--lengths", default="1K,2K,4K", help="prompt lengths in tokens (default: 1K,2K,4K)")
    evaluate.add_argument("--samples", type=_positive, default=10, help="samples per task and length (default: 10)")
    evaluate.add_argument("--attn", default="star,dense", help="methods, comma-separated (default: star,dense)")
    evaluate.add_argument("--blocks", default="4", help="star: blocks the context is cut into, comma-separated (default: 4)")
    evaluate.add_argument("--anchor-size", default="block",
                          help="star: anchor sizes as fractions of the block, comma-separated, e.g. 1/4,1/2,block "
                               "(default: block)")
    evaluate.add_argument("--seed", type=int, default=0, help="first sample's seed (default: 0)")
    evaluate.add_argument("--output", type=Path, default=None,
                          help="JSON results (default: eval_<model>.json in the current directory); the plot goes beside it")
    evaluate.add_argument("--resume", action="store_true",
                          help="keep what --output already holds (a stopped run's results) and measure only the "
                               "(task, length) cells it lacks or holds in part; same model, seed and samples")
    _model_flags(evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .launch import env_rank, run_guarded

    parser = build_parser()
    if env_rank() != 0:  # every rank parses the same arguments; one of them speaks
        parser.exit = lambda status=0, message=None: sys.exit(status)  # type: ignore[method-assign]
    args = parser.parse_args(argv)
    block, anchor = getattr(args, "block_size", None), getattr(args, "anchor_size", None)
    if block and isinstance(anchor, int) and anchor > block:
        parser.error(f"--anchor-size {anchor} exceeds --block-size {block}")
    try:
        resolve(args.model)
        if args.command == "run":
            _check_paths(args.input, args.output)
        if args.command == "bench":
            _bench_strategies(args.attn)
            _bench_lengths(args.lengths)
        if args.command == "eval":
            _eval_plan(args)
    except ValueError as exc:
        if env_rank() == 0:
            print(f"star_engine: {exc}", file=sys.stderr)
        return 2
    return run_guarded(lambda: _COMMANDS[args.command](args))


def _check_paths(input_path: Path, output_path: Path) -> None:
    if not input_path.is_file():
        raise ValueError(f"--input {input_path}: no such file")
    if output_path.exists() and output_path.resolve() == input_path.resolve():
        raise ValueError("--output must not be the input file")
    if output_path.is_dir():
        raise ValueError(f"--output {output_path} is a directory")


class Session:
    """The model, communicator and (on rank 0) tokenizer shared by the engines of one job."""

    def __init__(self, args: argparse.Namespace) -> None:
        from .checkpoint import load_model
        from .comm import make_communicator
        from .launch import init_distributed, select_device
        from .tokenizer import load_tokenizer

        self.args = args
        self.dist = init_distributed()
        self.device = select_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"), self.dist)
        dtype = DTYPES[args.dtype or ("bfloat16" if self.device.type == "cuda" else "float32")]
        self.say(f"star_engine: loading {args.model} on {_plural(self.dist.world, 'rank')} "
                 f"({_plural(self.dist.nodes, 'node')}), {self.device.type}, {dtype}")
        start = time.perf_counter()
        self.model = load_model(args.model, dtype, self.device)
        set_backend(args.attn_backend)
        backend = backend_for(self.device, dtype)
        self.comm = make_communicator(self.dist, self.device)
        eos = self.model.config.eos_token_ids
        self.tokenizer = load_tokenizer(args.model, eos) if self.dist.rank == 0 else None
        self.dist.sync()
        self.say(f"star_engine: ready in {time.perf_counter() - start:.1f} s; attention kernels: {backend}")

    def say(self, message: str) -> None:
        if self.dist.rank == 0:
            print(message, file=sys.stderr, flush=True)

    def engine(self, attn: str):
        from .attention import STRATEGIES, StarAttention
        from .schedule import Engine

        if attn == "star":
            strategy = StarAttention(self.dist, self.comm, self.args.block_size, self.args.anchor_size,
                                     self.args.anchor_mode)
        else:
            strategy = STRATEGIES[attn](self.dist, self.comm)
        max_tokens = self.args.max_tokens or self.model.config.max_position_embeddings
        return Engine(self.model, strategy, self.comm, self.dist, max_tokens,
                      cuda_graph=not self.args.no_cuda_graph)


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'s' if count != 1 else ''}"


def _run(args: argparse.Namespace) -> int:
    from .launch import GracefulStop

    with GracefulStop() as stop:
        return _answer_requests(args, stop)


def _answer_requests(args: argparse.Namespace, stop: GracefulStop) -> int:
    """Rank 0 reads, tokenizes and writes; every rank takes part in each request, and all
    leave together, between requests, once a rank was asked to stop."""
    session = Session(args)
    engine = session.engine(args.attn)
    dist = session.dist
    session.say(f"star_engine: {engine.strategy.describe()}, up to {engine.max_tokens} tokens per request")
    results = _Results(args.output, stop.writing) if dist.rank == 0 else None
    work = _prepared_requests(args, session, engine, results) if dist.rank == 0 else None
    answered = 0
    while True:
        item = next(work, None) if work is not None else None
        # Also where the others wait while rank 0 reads and tokenizes.
        if dist.any(stop.requested):
            session.say(f"star_engine: {stop.signal_name or 'stop'} on a rank: stopped after {answered} "
                        f"answered; the same command answers the rest -> {args.output}")
            return stop.EXIT_CODE
        item = dist.bcast(item, root=0)
        if item is None:
            break
        number, total, rid, context_ids, query_ids, max_new = item
        session.say(f"[{number}/{total}] {rid}: {len(context_ids)} context + {len(query_ids)} query tokens ...")
        gen = engine.generate(torch.as_tensor(context_ids), torch.as_tensor(query_ids), max_new)
        answered += 1
        if results is not None:
            record = {
                "id": rid,
                "output": session.tokenizer.decode(gen.tokens),
                "output_tokens": len(gen.tokens),
                "context_tokens": len(context_ids),
                "query_tokens": len(query_ids),
                "metrics": asdict(gen.metrics),
                "error": None,
            }
            results.write(record)
            m = gen.metrics
            tpot = "-" if m.tpot_s is None else f"{m.tpot_s * 1e3:.1f} ms"
            session.say(f"[{number}/{total}] {rid}: {len(gen.tokens)} tokens | phase 1 {m.phase1_s:.2f} s, "
                        f"first token {m.ttft_s:.2f} s, per token {tpot}")
    if results is not None:
        session.say(f"star_engine: {answered} answered, {results.errors} failed, {results.skipped} already done "
                    f"-> {args.output}")
    return 0


class _Results:
    """The output JSONL: ids already answered, and appending that survives an interruption
    (a line is written whole while holding `writing`, which a stop that abandons the job
    takes before it ends the process)."""

    def __init__(self, path: Path, writing: threading.Lock) -> None:
        self.path = path
        self.writing = writing
        self.done: set[Any] = set()
        self.skipped = self.errors = 0
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            text = path.read_text()
            if not text.endswith("\n"):  # a line cut short by an interruption: drop it
                text = text[: text.rfind("\n") + 1]
                with path.open("r+") as f:
                    f.truncate(len(text.encode()))
            for line in text.splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict) and record.get("error") is None and "id" in record:
                    self.done.add(_id_key(record["id"]))
        self.file = path.open("a")

    def write(self, record: dict[str, Any]) -> None:
        with self.writing:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()


def _id_key(rid: Any) -> str:
    return json.dumps(rid)


def _error_record(rid: Any, line: int | None, error: str) -> dict[str, Any]:
    record = {"id": rid, "output": None, "output_tokens": 0, "context_tokens": None,
              "metrics": None, "error": error}
    if line is not None:
        record["line"] = line
    return record


def _prepared_requests(args: argparse.Namespace, session: Session, engine, results: _Results) -> Iterator[tuple]:
    """Rank 0: valid, tokenized requests that fit; the others become error lines here."""
    from .schedule import RequestTooLarge

    with args.input.open(encoding="utf-8", errors="replace") as f:
        lines = [(n, line) for n, line in enumerate(f, start=1) if line.strip()]
    seen: set[str] = set()
    for number, (line_no, line) in enumerate(lines, start=1):
        request, error = _parse_request(line, args.max_new_tokens)
        rid = request.get("id") if isinstance(request, dict) else None
        if error is None:
            key = _id_key(rid)
            if key in seen:
                error = f"duplicate id {rid!r}"
            seen.add(key)
            if error is None and key in results.done:
                results.skipped += 1
                continue
        if error is None:
            context_ids, query_ids = session.tokenizer.prompt(request["context"], request["query"])
            max_new = request["max_new_tokens"]
            try:
                engine.check_fits(len(context_ids), len(query_ids), max_new)
            except RequestTooLarge as exc:
                error = f"{exc} (--max-tokens)"
        if error is not None:
            results.errors += 1
            results.write(_error_record(rid, line_no, error))
            session.say(f"[{number}/{len(lines)}] line {line_no}: {error}")
            continue
        yield number, len(lines), rid, context_ids, query_ids, max_new


def _parse_request(line: str, default_max_new: int) -> tuple[dict | None, str | None]:
    try:
        request = json.loads(line)
    except json.JSONDecodeError as exc:
        return None, f"not JSON: {exc}"
    if not isinstance(request, dict):
        return None, "a request must be a JSON object"
    for name in ("id", "context", "query"):
        if name not in request:
            return request, f"missing field {name!r}"
    if not isinstance(request["id"], (str, int)) or isinstance(request["id"], bool):
        return request, "'id' must be a string or an integer"
    for name in ("context", "query"):
        if not isinstance(request[name], str):
            return request, f"{name!r} must be a string"
    if not request["query"].strip():
        return request, "'query' is empty"
    max_new = request.get("max_new_tokens", default_max_new)
    if not isinstance(max_new, int) or isinstance(max_new, bool) or max_new < 1:
        return request, "'max_new_tokens' must be an integer >= 1"
    return {**request, "max_new_tokens": max_new}, None


def _demo(args: argparse.Namespace) -> int:
    from .tasks import make_sample, score

    session = Session(args)
    dist = session.dist
    sample = make_sample("niah_single_1", session.tokenizer, args.context_tokens, args.seed) if dist.rank == 0 else None
    sample = dist.bcast(sample, root=0)
    session.say(f"\nDocument: {len(sample.context_ids)} context tokens, {len(sample.query_ids)} query tokens."
                f"\nQuestion: {sample.query}\nAnswer begins: {sample.answer_prefix}"
                f"\nExpected: {', '.join(sample.answers)}\n")
    rows = []
    for attn in ("star", "dense"):
        engine = session.engine(attn)
        session.say(f"running {engine.strategy.describe()} ...")
        gen = engine.generate(torch.as_tensor(sample.context_ids), torch.as_tensor(sample.query_ids),
                              args.max_new_tokens)
        if dist.rank == 0:
            text = session.tokenizer.decode(gen.tokens).strip()
            rows.append((attn, text, score(text, sample.answers), gen.metrics))
        del engine
    if dist.rank == 0:
        print(_demo_table(rows, dist.world))
    return 0


def _demo_table(rows: list, world: int) -> str:
    def mib(values: list[int]) -> str:
        return f"{max(values) / 2**20:.0f}"

    header = ["", *(f"{attn} ({world} rank{'s' if world > 1 else ''})" for attn, _, _, _ in rows)]
    lines = [
        ["answer", *(repr(text) for _, text, _, _ in rows)],
        ["correct", *("yes" if hit == 1 else "no" for _, _, hit, _ in rows)],
        ["phase 1 (s)", *(f"{m.phase1_s:.3f}" for _, _, _, m in rows)],
        ["first token (s)", *(f"{m.ttft_s:.3f}" for _, _, _, m in rows)],
        ["per token (ms)", *("-" if m.tpot_s is None else f"{m.tpot_s * 1e3:.1f}" for _, _, _, m in rows)],
        ["peak memory, max rank (MiB)", *(mib(m.peak_mem_bytes) for _, _, _, m in rows)],
    ]
    table = [header, *lines]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table)


def _bench_strategies(attn: str) -> list[str]:
    strategies = [a.strip() for a in attn.split(",") if a.strip()]
    unknown = set(strategies) - {"star", "ring", "dense"}
    if unknown or not strategies:
        raise ValueError(f"--attn: unknown strategies {sorted(unknown)}; expected some of star, ring, dense")
    return strategies


def _bench_lengths(text: str) -> list[int]:
    from .benchmark import parse_tokens

    try:
        lengths = [parse_tokens(t.strip()) for t in text.split(",") if t.strip()]
    except ValueError:
        lengths = []
    if not lengths or min(lengths) < 1:
        raise ValueError(f"--lengths {text!r}: expected token counts such as 32K,64K,1M")
    return lengths


def _bench(args: argparse.Namespace) -> int:
    from . import benchmark

    strategies = _bench_strategies(args.attn)
    lengths = _bench_lengths(args.lengths)
    if args.replot is not None:
        if not benchmark.plot(json.loads(args.replot.read_text()), args.replot.with_suffix(".png")):
            raise ValueError("--replot needs matplotlib: pip install matplotlib")
        print(f"saved {args.replot.with_suffix('.png')}")
        return 0
    session = Session(args)
    measured = benchmark.environment(session.dist.world, session.device, ["python", "-m", "star_engine"])
    session.say(f"star_engine bench: {', '.join(strategies)} at {len(lengths)} lengths on {session.dist.world} rank(s)")
    name = bench_name(args.model, session.dist.world, args.block_size, args.anchor_size)
    output = args.output or Path(f"{name}.json")

    def write(rows: list[dict], ceilings: dict, complete: bool) -> dict:
        result = {**measured, "model": args.model,
                  "dtype": str(session.model.embed.weight.dtype).replace("torch.", ""),
                  "attention_backend": backend_for(session.device, session.model.embed.weight.dtype),
                  "query_tokens": args.query_tokens, "new_tokens": args.max_new_tokens, "complete": complete,
                  **ceilings, "rows": rows, "speedups": benchmark.speedups(rows)}
        if session.dist.rank == 0:
            benchmark.save(output, result)
        return result

    rows, ceilings = benchmark.run_benchmark(session.model, session.comm, session.dist, strategies, lengths,
                                             args.query_tokens, args.max_new_tokens, args.block_size,
                                             args.anchor_size, not args.no_cuda_graph, session.say,
                                             on_row=lambda rows, ceilings: write(rows, ceilings, complete=False))
    result = write(rows, ceilings, complete=True)
    if session.dist.rank == 0:
        print(benchmark.table(rows))
        for s in result["speedups"]:
            parts = [f"{k.replace('over_', 'over ')} {v:.2f}x" for k, v in s.items() if k != "context"]
            if parts:
                print(f"star at {s['context']} tokens: {', '.join(parts)} (time to first token)")
        plotted = benchmark.plot(result, output.with_suffix(".png"))
        session.say(f"saved {output}" + (f" and {output.with_suffix('.png')}" if plotted else
                                         " (no plot: matplotlib is not installed)"))
    return 0


def bench_name(model: str, ranks: int, block_size: int | None, anchor_size: int | float | None) -> str:
    """The default name of a bench result; a star layout other than the default gets a name
    of its own (e.g. ..._8ranks_anchor0.25), so that runs sit side by side."""
    layout = "".join(f"_{flag}{value:g}" for flag, value in (("block", block_size), ("anchor", anchor_size))
                     if value is not None)
    return f"e2e_{model.replace('/', '_')}_{ranks}ranks{layout}"


def _eval_plan(args: argparse.Namespace) -> tuple[list[str], list[int], list]:
    from . import evaluation
    from .tasks import TASKS

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"--tasks: unknown {unknown}; expected some of {', '.join(TASKS)}")
    try:
        blocks = [int(b) for b in args.blocks.split(",") if b.strip()]
        anchors = [evaluation.parse_anchor(a) for a in args.anchor_size.split(",") if a.strip()]
        methods = evaluation.methods([a.strip() for a in args.attn.split(",") if a.strip()], blocks, anchors)
    except ValueError as exc:
        raise ValueError(f"--attn/--blocks/--anchor-size: {exc}") from None
    if not methods or any(b < 1 for b in blocks):
        raise ValueError("--attn/--blocks: expected star and/or dense, and block counts >= 1")
    return tasks, _bench_lengths(args.lengths), methods


def _eval(args: argparse.Namespace) -> int:
    from . import evaluation
    from .benchmark import environment, save

    tasks, lengths, methods = _eval_plan(args)
    session = Session(args)
    measured = environment(session.dist.world, session.device, ["python", "-m", "star_engine"])
    session.say(f"star_engine eval: {len(tasks)} tasks x {len(lengths)} lengths x {args.samples} samples, "
                f"{len(methods)} methods")
    name = f"eval_{Path(args.model).stem if Path(args.model).exists() else args.model}"
    output = args.output or Path(f"{name}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    header = {**measured, "model": args.model, "samples_per_cell": args.samples, "seed": args.seed}
    earlier: list[dict] = []
    if args.resume:
        earlier_run = _earlier_eval(output, header) if session.dist.rank == 0 else None
        earlier_run = session.dist.bcast(earlier_run, root=0)
        if earlier_run is not None:
            earlier = earlier_run["rows"]
            # Which runs measured which cells: a resumed file may hold several commits' rows.
            header["earlier_runs"] = [*earlier_run.get("earlier_runs", []),
                                      {k: earlier_run[k] for k in ("commit", "date", "command")}]

    def write(rows: list[dict], complete: bool) -> str:
        summary = evaluation.summarise(rows)
        result = {**header, "complete": complete, "summary": summary, "rows": rows}
        save(output, result)
        text = evaluation.table(summary)
        note = "" if complete else "incomplete: the run was stopped before every cell was measured\n"
        output.with_suffix(".txt").write_text(f"{header['command']}\n{args.samples} samples per cell\n{note}\n{text}\n")
        return text

    rows = evaluation.run_evaluation(session.model, session.tokenizer, session.comm, session.dist, tasks,
                                     lengths, args.samples, methods, args.seed, session.say,
                                     on_cell=lambda partial: write(partial, complete=False), earlier=earlier)
    if session.dist.rank == 0:
        print(write(rows, complete=True))
        plotted = evaluation.plot(evaluation.summarise(rows), f"{args.model}: accuracy, {args.samples} samples per cell",
                                  output.with_suffix(".png"))
        session.say(f"saved {output}, the table as {output.with_suffix('.txt')}"
                    + (f" and the plot as {output.with_suffix('.png')}" if plotted else ""))
    return 0


def _earlier_eval(output: Path, header: dict) -> dict | None:
    """The results in `output` that a resumed run may keep, or None if there are none."""
    if not output.exists():
        return None
    try:
        earlier = json.loads(output.read_text())
    except ValueError as exc:
        raise ValueError(f"--resume: {output} is not JSON ({exc})") from None
    if not isinstance(earlier, dict) or not isinstance(earlier.get("rows"), list):
        raise ValueError(f"--resume: {output} is not an eval result (no rows)")
    for key in ("model", "seed", "samples_per_cell"):
        if earlier.get(key) != header[key]:
            raise ValueError(f"--resume: {output} has {key} {earlier.get(key)!r}, this run {header[key]!r}; "
                             "choose another --output")
    return earlier


_COMMANDS = {"run": _run, "demo": _demo, "bench": _bench, "eval": _eval}
