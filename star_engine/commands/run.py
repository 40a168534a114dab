"""`run`: answer the requests of a JSONL file, one result line each, appended as they are
answered; a rerun answers only the ids the output does not hold yet."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from ..flags import (add_generation_flags, add_model_flags, add_star_flags, kv_cache_settings, positive,
                     runtime_settings, star_specs)
from ..names import STRATEGIES

if TYPE_CHECKING:
    from torch import Tensor

    from ..answer_file import AnswerFile
    from ..engine import Engine, Generation
    from ..launch.stopping import GracefulStop
    from ..request_file import IndexedLine
    from ..request_plan import RequestPlan
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
    run.add_argument("--batch", type=positive, default=1, metavar="N",
                     help="requests decoded together, each joining as another leaves; answers are written "
                          "as they finish (default: 1, one request at a time)")
    add_model_flags(run)
    add_star_flags(run)
    add_generation_flags(run, max_new_tokens=64, meaning="tokens to generate at most, unless a request says otherwise")


def check(args: argparse.Namespace) -> None:
    """Also makes the settings: args.runtime, args.cache and args.spec, the strategy to run."""
    from ..answer_file import check_answer_file, is_stream

    args.runtime = runtime_settings(args)
    [args.spec] = star_specs(args, [args.attn])
    args.cache = kv_cache_settings(args, args.batch)
    if args.input.is_dir():
        raise ValueError(f"--input {args.input} is a directory; give the requests file")
    if not args.input.is_file():
        raise ValueError(f"--input {args.input}: no such file")
    if not is_stream(args.output) and args.output.exists() and args.output.resolve() == args.input.resolve():
        raise ValueError("--output must not be the input file")
    check_answer_file(args.output)


@dataclass(frozen=True)
class PreparedRequest:
    """A valid request that fits, tokenized by rank 0 and handed to every rank."""
    number: int  # its place among the file's requests, from 1
    total: int  # requests in the file
    line: int  # its line in the file
    digest: str  # of its line
    shown_id: str  # its id as progress lines print it
    rid: Any  # its id, as the file gives it
    context_ids: list[int] | None  # None: the same as the request before's
    query_ids: list[int]
    plan: RequestPlan


def main(args: argparse.Namespace) -> int:
    from ..launch.stopping import GracefulStop

    with GracefulStop() as stop:
        return _answer_requests(args, stop)


def _answer_requests(args: argparse.Namespace, stop: GracefulStop) -> int:
    """Rank 0 reads, tokenizes and writes; every rank takes part in each request, and all
    leave together, between requests (with --batch, once the requests in hand are done),
    once a rank was asked to stop."""
    from ..answer_file import AnswerFile
    from ..session import Session

    session = Session(args.runtime, args.spec, args.cache)
    engine = session.engine(args.spec, args.cache)
    dist = session.dist
    batch = f", {engine.batch} at once" if engine.batch > 1 else ""
    session.say(f"star_engine: {engine.strategy.describe()}, up to {engine.max_tokens} tokens per request{batch}")
    answers = AnswerFile(args.output, stop.writing) if dist.rank == 0 else None
    if answers is not None:
        stop.before_abandoning(lambda: _note_stop(answers, session))
    try:
        work = _prepared_requests(args, session, engine, answers) if dist.rank == 0 else None
        handed = _HandOut(work, session, stop, answers)
        answered = 0
        for request, gen in _answered(engine, iter(handed)):
            answered += 1
            if answers is not None:
                _write_answer(answers, session, request, gen)
        if answers is not None:
            _note_stop(answers, session)
        if handed.stopped:
            session.say(f"star_engine: {stop.signal_name or 'stop'} on a rank: stopped after {answered} "
                        f"answered; the same command answers the rest -> {args.output}")
            return stop.EXIT_CODE
        if answers is not None:
            session.say(f"star_engine: {answered} answered, {answers.errors} failed, {answers.skipped} already done"
                        + (f", {answers.already_reported} errors reported before" if answers.already_reported
                           else "") + f" -> {args.output}")
        return 0
    finally:
        if answers is not None:
            answers.close()


@dataclass(frozen=True)
class _Request:
    """A request as every rank holds it: its context's ids in full."""
    prepared: PreparedRequest
    context: Tensor
    query: Tensor


class _HandOut:
    """Every rank: the requests rank 0 prepares, one at a time as the engine takes them,
    until there are none or a rank was asked to stop (then `stopped`). Rank 0 notes each
    in `answers` as in hand."""

    def __init__(self, work: Iterator[PreparedRequest] | None, session: Session, stop: GracefulStop,
                 answers: AnswerFile | None) -> None:
        self.work, self.session, self.stop, self.answers = work, session, stop, answers
        self.stopped = False

    def __iter__(self) -> Iterator[_Request]:
        import torch

        dist, context = self.session.dist, None
        while True:
            request = next(self.work, None) if self.work is not None else None
            # Also where the others wait while rank 0 reads and tokenizes.
            if dist.any(self.stop.requested):
                self.stopped = True
                return
            request = dist.bcast(request, root=0)
            if request is None:
                return
            if self.answers is not None:
                self.answers.hand_out(request.line, request.digest, request.rid)
            if request.context_ids is not None:
                context = torch.as_tensor(request.context_ids)
            self.session.say(f"[{request.number}/{request.total}] {request.shown_id}: {len(context)} context + "
                             f"{len(request.query_ids)} query tokens ...")
            yield _Request(request, context, torch.as_tensor(request.query_ids))


def _answered(engine: Engine, requests: Iterator[_Request]) -> Iterator[tuple[_Request, Generation]]:
    """Each request with its answer: one at a time, or up to the engine's batch decoding
    together (in the order they finish)."""
    if engine.batch == 1:
        for r in requests:
            yield r, engine.generate(r.context, r.query, r.prepared.plan.max_new_tokens, plan=r.prepared.plan,
                                     reuse_context=True)
        return
    in_hand: dict[int, _Request] = {}  # by index, until answered: a long job holds only these

    def jobs() -> Iterator[tuple[Tensor, Tensor, RequestPlan]]:
        for index, r in enumerate(requests):
            in_hand[index] = r
            yield r.context, r.query, r.prepared.plan

    for index, gen in engine.generate_many(jobs()):
        yield in_hand.pop(index), gen


def _write_answer(answers: AnswerFile, session: Session, request: _Request, gen: Generation) -> None:
    prepared, m = request.prepared, gen.metrics
    answers.write_answer({
        "id": prepared.rid,
        "output": session.tokenizer.decode(gen.tokens),
        "output_tokens": len(gen.tokens),
        "context_tokens": len(request.context),
        "query_tokens": len(request.query),
        "metrics": asdict(m),
        "error": None,
    })
    tpot = "-" if m.tpot_s is None else f"{m.tpot_s * 1e3:.1f} ms"
    phase1 = "context encoded before" if m.context_reused else f"phase 1 {m.phase1_s:.2f} s"
    session.say(f"[{prepared.number}/{prepared.total}] {prepared.shown_id}: {len(gen.tokens)} tokens | {phase1}, "
                f"first token {m.ttft_s:.2f} s, per token {tpot}")


def _note_stop(answers: AnswerFile, session: Session) -> None:
    """Where the job ends, stopped (the requests in hand abandoned, if any) or done."""
    from ..answer_file import NOT_FINISHED
    from ..request_file import shown

    for line, rid in answers.note_stop():
        session.say(f"line {line} ({shown(rid)}): {NOT_FINISHED}")


def _prepared_requests(args: argparse.Namespace, session: Session, engine: Engine, answers: AnswerFile
                       ) -> Iterator[PreparedRequest]:
    """Rank 0: valid, tokenized requests that fit; every other line becomes an error record
    here (once: an earlier run's record of the same line and error stands). A request done
    already is skipped without reading its line again."""
    from ..request_file import RequestFile, printable, shown
    from ..request_plan import RequestTooLarge

    with RequestFile(args.input, args.max_new_tokens) as requests:
        total = len(requests.lines)
        seen: set[str] = set()
        last_context_ids: list[int] | None = None  # of the request sent last
        for number, indexed in enumerate(_by_context(requests.lines), start=1):
            error = None
            if indexed.id is not None:  # a valid request: done already, or a duplicate, without reading it
                key = json.dumps(indexed.id)
                error = f"duplicate id {shown(indexed.id)}" if key in seen else None
                seen.add(key)
                if error is None and key in answers.answered:
                    answers.skipped += 1
                    continue
                if error is None and answers.given_up(indexed.digest):
                    answers.already_reported += 1
                    continue
            line = requests.read(indexed)
            error = error or line.error
            if error is None:
                request = line.request
                try:
                    context_ids, query_ids = session.tokenizer.prompt(request["context"], request["query"])
                except Exception as exc:  # noqa: BLE001 - whatever a tokenizer rejects is this line's error
                    error = f"the tokenizer cannot read this request: {type(exc).__name__}: {exc}"
            if error is None:
                try:
                    plan = engine.plan(len(context_ids), len(query_ids), request["max_new_tokens"])
                except RequestTooLarge as exc:
                    error = f"{exc} (--max-tokens)"
            if error is not None:
                if answers.write_error(line.number, line.digest, line.id, error):
                    session.say(f"[{number}/{total}] line {line.number}: {printable(error)}")
                continue
            same_context = context_ids == last_context_ids
            last_context_ids = context_ids
            yield PreparedRequest(number, total, line.number, line.digest, line.shown_id, line.id,
                                  None if same_context else context_ids, query_ids, plan)


def _by_context(lines: list[IndexedLine]) -> list[IndexedLine]:
    """The lines with the requests of one context (the same `context_id`, else the same
    text) together, in the order each context first appears: the engine then encodes a
    context once for all its questions."""
    return sorted(lines, key=lambda line: (line.context, line.number))
