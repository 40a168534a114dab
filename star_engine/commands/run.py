"""`run`: answer the requests of a JSONL file, one result line each, appended as they are
answered; a rerun answers only the ids the output does not hold yet."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from ..flags import (add_generation_flags, add_model_flags, add_scale_out_flags, add_star_flags, kv_cache_settings,
                     positive, positive_seconds, runtime_settings, scale_out_settings, star_specs)
from ..names import RUN_HOSTS_PER_REQUEST, STRATEGIES

if TYPE_CHECKING:
    from ..answer_file import AnswerFile
    from ..dispatch import Group
    from ..groups import RequestSizing
    from ..hand_out import Done, Work
    from ..launch.stopping import GracefulStop
    from ..request_file import IndexedLine
    from ..session import Session


def add_parser(commands: argparse._SubParsersAction) -> None:
    run = commands.add_parser(
        "run", help="answer the requests of a JSONL file",
        description='Reads JSONL requests {"id", "context", "query", "max_new_tokens"?} and appends one '
                    'result line per request: {"id", "output", "output_tokens", "context_tokens", '
                    '"hosts", "metrics": {"phase1_s", "ttft_s", "tpot_s", "peak_mem_bytes": [per rank]}, "error"}. '
                    "A bad request gets a line with its error and the run goes on. Ids already answered "
                    "in the output file are skipped, so an interrupted run can be started again.")
    run.add_argument("--input", required=True, type=Path, help="requests, one JSON object per line")
    run.add_argument("--output", required=True, type=Path, help="results, appended one JSON object per line")
    run.add_argument("--attn", choices=STRATEGIES, default="star",
                     help="star: blocks over a request's hosts, approximate; ring: exact, K/V passed around "
                          "them; dense: the whole context on one of them; a request on one host runs dense "
                          "(default: star)")
    run.add_argument("--batch", type=positive, default=1, metavar="N",
                     help="requests decoded together, each joining as another leaves; answers are written "
                          "as they finish (default: 1, one request at a time)")
    run.add_argument("--contexts", type=positive, default=None, metavar="C",
                     help="with --batch: contexts held whole at once (default: one per request of the batch); "
                          "the batch's other arenas hold only a request's query and answer (--max-tail), for "
                          "requests that ask about a context another request of the batch holds, which they "
                          "read there: many questions about one long document in the memory of few")
    run.add_argument("--max-tail", type=positive, default=None, metavar="TOKENS",
                     help="tokens a request may have after its context, query and answer together; longer "
                          "ones are refused (default: --max-tokens)")
    add_scale_out_flags(run, default=RUN_HOSTS_PER_REQUEST)
    run.add_argument("--ttft-target", type=positive_seconds, default=None, metavar="SECONDS",
                     help="with --hosts-per-request auto: each request on the fewest hosts the planner predicts "
                          "to reach its first token within SECONDS (from the job's calibration, "
                          "STAR_ENGINE_CALIBRATION), instead of by --max-block; all hosts where none does")
    add_model_flags(run)
    add_star_flags(run)
    add_generation_flags(run, max_new_tokens=64, meaning="tokens to generate at most, unless a request says otherwise")


def check(args: argparse.Namespace) -> None:
    """Also makes the settings: args.runtime, args.cache, args.scale_out and args.spec, the
    strategy to run."""
    from ..answer_file import check_answer_file, is_stream

    args.runtime = runtime_settings(args)
    [args.spec] = star_specs(args, [args.attn])
    if args.contexts is not None and args.contexts > args.batch:
        raise ValueError(f"--contexts {args.contexts} is more than --batch {args.batch} holds")
    args.cache = replace(kv_cache_settings(args, args.batch), max_tail=args.max_tail, contexts=args.contexts)
    [args.scale_out] = scale_out_settings(args)
    if args.input.is_dir():
        raise ValueError(f"--input {args.input} is a directory; give the requests file")
    if not args.input.is_file():
        raise ValueError(f"--input {args.input}: no such file")
    if not is_stream(args.output) and args.output.exists() and args.output.resolve() == args.input.resolve():
        raise ValueError("--output must not be the input file")
    check_answer_file(args.output)


@dataclass(frozen=True)
class RequestLineInfo:
    """What rank 0 keeps of a request's line while it is answered."""
    number: int  # its place among the file's requests, from 1
    total: int  # requests in the file
    line: int  # its line in the file
    digest: str  # of its line
    shown_id: str  # its id as progress lines print it
    rid: Any  # its id, as the file gives it


def main(args: argparse.Namespace) -> int:
    from ..launch.stopping import GracefulStop

    with GracefulStop() as stop:
        return _answer_requests(args, stop)


def _answer_requests(args: argparse.Namespace, stop: GracefulStop) -> int:
    """Rank 0 reads, tokenizes and writes, and hands each request to a group of hosts of
    its size; every rank works in the groups it is given, and all leave together once the
    requests are answered, or a rank was asked to stop and the requests in hand are done."""
    from ..answer_file import AnswerFile
    from ..hand_out import serve
    from ..session import Session, plural

    session = Session(args.runtime, args.spec, args.cache)
    groups, engines, sizing = session.group_engines(args.spec, args.cache, args.scale_out)
    dist = session.dist
    if dist.rank == 0:
        for size, engine in sorted(engines.items()):
            on = "" if len(engines) == 1 and size == groups.count else f"groups of {plural(size, 'host')}: "
            batch = f", {engine.batch} at once" if engine.batch > 1 else ""
            session.say(f"star_engine: {on}{engine.strategy.describe()}, up to {engine.max_tokens} tokens per "
                        f"request{batch}")
    answers = AnswerFile(args.output, stop.writing) if dist.rank == 0 else None
    if answers is not None:
        stop.before_abandoning(lambda: _note_stop(answers, session))
    try:
        work = _prepared_requests(args, session, sizing, answers) if answers is not None else None
        counts = {"answered": 0}

        def on_done(done: Done) -> None:
            counts["answered"] += 1
            _write_answer(answers, session, done, groups.tp)

        served = serve(dist, groups, engines, stop, work, on_done, args.batch,
                       lambda w, group: _handed_out(answers, session, w, group, groups.count))
        if answers is None:
            return stop.EXIT_CODE if served.stopped else 0
        _note_stop(answers, session)
        if served.stopped:
            session.say(f"star_engine: {stop.signal_name or 'stop'} on a rank: stopped after {counts['answered']} "
                        f"answered; the same command answers the rest -> {args.output}")
            return stop.EXIT_CODE
        session.say(f"star_engine: {counts['answered']} answered, {answers.errors} failed, {answers.skipped} "
                    "already done" + (f", {answers.already_reported} errors reported before"
                                      if answers.already_reported else "") + f" -> {args.output}")
        return 0
    finally:
        if answers is not None:
            answers.close()


def _handed_out(answers: AnswerFile, session: Session, work: Work, group: Group, hosts: int) -> None:
    info = work.about
    answers.hand_out(info.line, info.digest, info.rid)
    on = "" if group.size == hosts else f" on {hosts_named(group)}"
    session.say(f"[{info.number}/{info.total}] {info.shown_id}: {work.plan.context_len} context + "
                f"{len(work.query_ids)} query tokens{on} ...")


def hosts_named(group: Group) -> str:
    """'host 2', 'hosts 0-3'."""
    return f"host {group.first}" if group.size == 1 else f"hosts {group.first}-{group.first + group.size - 1}"


def _write_answer(answers: AnswerFile, session: Session, done: Done, tp: int) -> None:
    info, gen, m = done.work.about, done.generation, done.generation.metrics
    answers.write_answer({
        "id": info.rid,
        "output": session.tokenizer.decode(gen.tokens),
        "output_tokens": len(gen.tokens),
        "context_tokens": done.work.plan.context_len,
        "query_tokens": len(done.work.query_ids),
        "hosts": list(done.group.hosts),
        "metrics": asdict(m),
        "error": None,
    })
    tpot = "-" if m.tpot_s is None else f"{m.tpot_s * 1e3:.1f} ms"
    phase1 = "context encoded before" if m.context_reused else f"phase 1 {m.phase1_s:.2f} s"
    session.say(f"[{info.number}/{info.total}] {info.shown_id}: {len(gen.tokens)} tokens | {phase1}, "
                f"first token {m.ttft_s:.2f} s, per token {tpot}")


def _note_stop(answers: AnswerFile, session: Session) -> None:
    """Where the job ends, stopped (the requests in hand abandoned, if any) or done."""
    from ..answer_file import NOT_FINISHED
    from ..request_file import shown

    for line, rid in answers.note_stop():
        session.say(f"line {line} ({shown(rid)}): {NOT_FINISHED}")


def _prepared_requests(args: argparse.Namespace, session: Session, sizing: RequestSizing, answers: AnswerFile
                       ) -> Iterator[Work]:
    """Rank 0: valid, tokenized requests that fit; every other line becomes an error record
    here (once: an earlier run's record of the same line and error stands). A request done
    already is skipped without reading its line again."""
    from ..hand_out import Work
    from ..request_file import RequestFile, printable, shown
    from ..request_plan import RequestTooLarge

    with RequestFile(args.input, args.max_new_tokens) as requests:
        total = len(requests.lines)
        questions = Counter(line.context for line in requests.lines)  # of each context
        seen: set[str] = set()
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
                    question = session.tokenizer.question_tokens(request["query"])
                except Exception as exc:  # noqa: BLE001 - whatever a tokenizer rejects is this line's error
                    error = f"the tokenizer cannot read this request: {type(exc).__name__}: {exc}"
            if error is None:
                try:
                    hosts, plan = sizing.plan(len(context_ids), len(query_ids), request["max_new_tokens"],
                                              shared_context=questions[indexed.context] > 1,
                                              question_tokens=question)
                except RequestTooLarge as exc:
                    error = f"{exc} (--{exc.limit.replace('_', '-')})"
            if error is not None:
                if answers.write_error(line.number, line.digest, line.id, error):
                    session.say(f"[{number}/{total}] line {line.number}: {printable(error)}")
                continue
            yield Work(number, context_ids, query_ids, plan, hosts, sizing.cost(hosts, plan),
                       RequestLineInfo(number, total, line.number, line.digest, line.shown_id, line.id),
                       indexed.context)


def _by_context(lines: list[IndexedLine]) -> list[IndexedLine]:
    """The lines with the requests of one context (the same `context_id`, else the same
    text) together, in the order each context first appears: the engine then encodes a
    context once for all its questions."""
    return sorted(lines, key=lambda line: (line.context, line.number))
