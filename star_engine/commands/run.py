"""`run`: answer the requests of a JSONL file, one result line each, appended as they are
answered; a rerun answers only the ids the output does not hold yet."""

from __future__ import annotations

import argparse
import json
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from ..flags import add_generation_flags, add_model_flags, add_star_flags, star_specs
from ..names import STRATEGIES

if TYPE_CHECKING:
    from ..launch import GracefulStop
    from ..plan import RequestPlan
    from ..schedule import Engine
    from ..session import Session


def add_parser(commands: argparse._SubParsersAction) -> None:
    run = commands.add_parser(
        "run", help="answer the requests of a JSONL file",
        description='Reads JSONL requests {"id", "context", "query", "max_new_tokens"?} and appends one '
                    'result line per request: {"id", "output", "output_tokens", "context_tokens", '
                    '"metrics": {"phase1_s", "ttft_s", "tpot_s", "peak_mem_bytes": [per rank]}, "error"}. '
                    "A bad request gets a line with its error and the run goes on. Ids already answered "
                    "in the output file are skipped, so an interrupted run can be started again.")
    run.add_argument("--input", required=True, type=Path, help="requests, one JSON object per line")
    run.add_argument("--output", required=True, type=Path, help="results, appended one JSON object per line")
    run.add_argument("--attn", choices=STRATEGIES, default="star",
                     help="star: blocks over all ranks, approximate; ring: exact, K/V passed around the "
                          "ranks; dense: the whole context on one rank (default: star)")
    add_model_flags(run)
    add_star_flags(run)
    add_generation_flags(run, max_new_tokens=64)


def check(args: argparse.Namespace) -> None:
    """Also makes args.spec, the strategy to run."""
    [args.spec] = star_specs(args, [args.attn])
    if not args.input.is_file():
        raise ValueError(f"--input {args.input}: no such file")
    if args.output.exists() and args.output.resolve() == args.input.resolve():
        raise ValueError("--output must not be the input file")
    if args.output.is_dir():
        raise ValueError(f"--output {args.output} is a directory")


@dataclass(frozen=True)
class PreparedRequest:
    """A valid request that fits, tokenized by rank 0 and handed to every rank."""
    number: int  # its place among the file's requests, from 1
    total: int  # requests in the file
    rid: Any  # its id, as the file gives it
    context_ids: list[int]
    query_ids: list[int]
    plan: RequestPlan


def main(args: argparse.Namespace) -> int:
    from ..launch import GracefulStop

    with GracefulStop() as stop:
        return _answer_requests(args, stop)


def _answer_requests(args: argparse.Namespace, stop: GracefulStop) -> int:
    """Rank 0 reads, tokenizes and writes; every rank takes part in each request, and all
    leave together, between requests, once a rank was asked to stop."""
    import torch

    from ..session import Session

    session = Session(args)
    engine = session.engine(args.spec)
    dist = session.dist
    session.say(f"star_engine: {engine.strategy.describe()}, up to {engine.max_tokens} tokens per request")
    results = _Results(args.output, stop.writing) if dist.rank == 0 else None
    work = _prepared_requests(args, session, engine, results) if dist.rank == 0 else None
    answered = 0
    while True:
        request = next(work, None) if work is not None else None
        # Also where the others wait while rank 0 reads and tokenizes.
        if dist.any(stop.requested):
            session.say(f"star_engine: {stop.signal_name or 'stop'} on a rank: stopped after {answered} "
                        f"answered; the same command answers the rest -> {args.output}")
            return stop.EXIT_CODE
        request = dist.bcast(request, root=0)
        if request is None:
            break
        where = f"[{request.number}/{request.total}] {request.rid}"
        session.say(f"{where}: {len(request.context_ids)} context + {len(request.query_ids)} query tokens ...")
        gen = engine.generate(torch.as_tensor(request.context_ids), torch.as_tensor(request.query_ids),
                              request.plan.max_new_tokens, plan=request.plan)
        answered += 1
        if results is not None:
            results.write({
                "id": request.rid,
                "output": session.tokenizer.decode(gen.tokens),
                "output_tokens": len(gen.tokens),
                "context_tokens": len(request.context_ids),
                "query_tokens": len(request.query_ids),
                "metrics": asdict(gen.metrics),
                "error": None,
            })
            m = gen.metrics
            tpot = "-" if m.tpot_s is None else f"{m.tpot_s * 1e3:.1f} ms"
            session.say(f"{where}: {len(gen.tokens)} tokens | phase 1 {m.phase1_s:.2f} s, "
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


def _prepared_requests(args: argparse.Namespace, session: Session, engine: Engine, results: _Results
                       ) -> Iterator[PreparedRequest]:
    """Rank 0: valid, tokenized requests that fit; the others become error lines here."""
    from ..plan import RequestTooLarge

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
            try:
                plan = engine.plan(len(context_ids), len(query_ids), request["max_new_tokens"])
            except RequestTooLarge as exc:
                error = f"{exc} (--max-tokens)"
        if error is not None:
            results.errors += 1
            results.write(_error_record(rid, line_no, error))
            session.say(f"[{number}/{len(lines)}] line {line_no}: {error}")
            continue
        yield PreparedRequest(number, len(lines), rid, context_ids, query_ids, plan)


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
