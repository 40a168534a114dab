"""One decode step: a token for each of up to `rows` requests, captured once in a CUDA graph
on GPUs and replayed for every later step, whatever requests its rows hold."""

from __future__ import annotations

import torch

from . import _C
from .attention.decode import DecodeRows
from .attention.phase2 import token_attention
from .comm import Communicator
from .launch.control import Place
from .model import Transformer


def decode_rows(requests: int, batch: int, padded: bool) -> int:
    """The rows of the decode step that serves this many requests at once. Padded (the
    kernel's path, where each step is a CUDA graph): the next power of two, at most batch,
    so that an engine captures a handful of graphs whatever sets of requests it meets;
    else exactly one row per request."""
    if not padded:
        return requests
    return min(batch, 1 << (requests - 1).bit_length())


class Decoder:
    """One decode step of one token for each of up to `rows` requests, with shapes that
    never change: the tokens and their positions live in device tensors that the step
    itself advances, each KV length in its arena's (the query rank counts each new token's
    slot there), and which arena a row reads in DecodeRows' tables. On a GPU whose shapes
    the decode kernel serves, the step (all layers, the collectives and the merges, the
    choice of the next tokens and their broadcast) is captured once in a CUDA graph and
    replayed for every later step, whatever requests its rows hold: one graph for rows
    that read no shared context, one for rows of which some do (its extra launches)."""

    def __init__(self, model: Transformer, rows: int, capacity: int, comm: Communicator, place: Place,
                 cuda_graph: bool) -> None:
        self.model, self.comm, self.place = model, comm, place
        cfg, weight = model.config, model.embed.weight
        self.rows = DecodeRows(rows, cfg.num_layers, model.heads, model.kv_heads, cfg.head_dim, capacity,
                               weight.dtype, weight.device)
        self.token_ids = torch.zeros(rows, dtype=torch.int64, device=weight.device)
        self.positions = torch.zeros(rows, dtype=torch.int64, device=weight.device)
        self.logits = torch.zeros(rows, cfg.vocab_size, dtype=torch.float32, device=weight.device)
        self.attend = token_attention(self.rows, comm, place.is_query_rank)
        self.use_graph = cuda_graph and self.rows.kernel
        self.graphs: dict[bool, torch.cuda.CUDAGraph] = {}  # by whether a row reads a shared context
        self.held = 0
        self.steps, self.replayed = 0, False  # taken so far, and how the last one ran: for messages

    def start(self, arenas: list[_C.KVArena], tokens: list[int], positions: list[int],
              prefixes: list[tuple[_C.KVArena, int] | None] | None = None) -> None:
        """The requests of the next steps, a row each: their (decoding) arenas, the tokens to
        feed and their positions, and the context each reads from another arena, if any
        (DecodeRows.hold). Rows beyond them are padding."""
        self.rows.hold(arenas, prefixes)
        self.held, padding = len(tokens), [0] * (self.rows.rows - len(tokens))
        self.token_ids.copy_(torch.tensor(tokens + padding))
        self.positions.copy_(torch.tensor(positions + padding))

    def release(self) -> None:
        """Holds no arena until the next start."""
        self.rows.release()

    def step(self) -> None:
        self.steps += 1
        graph = self.graphs.get(self.rows.reads_shared)
        self.replayed = graph is not None
        if not self.use_graph:
            self._step()
        elif graph is None:
            self._step()  # a real step, which also warms up what the capture records
            graph = self.graphs[self.rows.reads_shared] = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):  # records the next step; runs nothing
                self._step()
        else:
            graph.replay()

    def tokens(self) -> list[int]:
        """The tokens the last step chose for the requests held, a row each."""
        how = "replayed from its CUDA graph" if self.replayed else "eager"
        self.comm.synchronize(f"decode step {self.steps} of {self.rows.rows} row{'s' * (self.rows.rows > 1)} ({how})")
        return self.token_ids[:self.held].tolist()

    def _step(self) -> None:
        if self.place.is_query_rank:
            self.rows.add_token()  # the slot of the token fed now, which every layer writes
        hidden = self.model(self.token_ids, self.positions, self.attend)
        if self.place.is_query_rank:
            self.logits.copy_(self.model.logits(hidden))
            self.token_ids.copy_(self.logits.argmax(-1))
        self.comm.broadcast(self.token_ids, root=self.place.query_rank)
        self.positions += 1
