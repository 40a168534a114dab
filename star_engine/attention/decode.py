"""Attention of one new token per request over that request's layer of its KV arena, for
decoding: on a GPU the extension's split-KV kernel, which reads each length from its
arena's device tensor, so that a decode step can be captured in a CUDA graph and replayed
as the caches grow. Requests that decode together go through one launch per layer, each
row reading its own arena; a context that several of them share is read once for all of
them by a second launch."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .. import _C, ops
from .local import local_attention_lse
from .merge import merge_into

# Query heads of one kv head that one entry of the shared-context kernel takes (its
# kMaxSharedQueryRows): readers x (heads // kv_heads).
SHARED_QUERY_ROWS = 128


def decode_kernel_serves(heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                         device: torch.device) -> bool:
    """Whether the split-KV decode kernel serves this shape (else decoding runs eagerly)."""
    return (device.type == "cuda" and ops.WITH_CUDA and dtype in (torch.float16, torch.bfloat16)
            and head_dim in (64, 128) and heads % kv_heads == 0 and heads // kv_heads <= 8)


class DecodeRows:
    """`rows` rows of one decode step, row i over the arena of the request it holds, after,
    where its request reads one, a context another arena holds (shared by several rows).

    On the kernel's path, each layer's token writes and attention are one launch for all
    rows, which find their arenas through device tables of addresses: the same launches
    serve any requests (a captured step is replayed after `hold` has rewritten the tables),
    and rows beyond the requests held point at an empty length, so they write nothing and
    attend to nothing. A shared context is read once for all its rows, the row of the request
    that holds it included (which then attends to its own keys after the context), by a
    second launch, which merges into each row's result over its own keys. Elsewhere there
    are exactly as many rows as requests, attended one by one, a shared context once for
    its rows. Arenas held must have the model's layers, and outlive their time here."""

    def __init__(self, rows: int, num_layers: int, heads: int, kv_heads: int, head_dim: int,
                 capacity: int, dtype: torch.dtype, device: torch.device) -> None:
        self.rows, self.num_layers, self.capacity = rows, num_layers, capacity
        self.kv_heads = kv_heads
        self.arenas: list[_C.KVArena] = []
        self.prefixes: list[tuple[_C.KVArena, int] | None] = []
        self.readers: dict[tuple[_C.KVArena, int], list[int]] = {}  # the rows of each shared context
        self.first_keys: list[int] = []  # of each row's own arena, that it attends to
        self.kernel = decode_kernel_serves(heads, kv_heads, head_dim, dtype, device)
        if self.kernel:
            self.addresses = torch.zeros(num_layers, 2, rows, dtype=torch.int64, device=device)  # [layer, K/V, row]
            self.lengths = torch.zeros(rows, dtype=torch.int64, device=device)  # of each row's int32 length
            self.capacities = torch.zeros(rows, dtype=torch.int64, device=device)
            self.first_key_table = torch.zeros(rows, dtype=torch.int64, device=device)
            self.active = torch.zeros(1, dtype=torch.int32, device=device)  # rows that hold a request
            self.empty_length = torch.zeros(1, dtype=torch.int32, device=device)
            self.splits = _decode_splits(device, capacity, kv_heads, rows)
            # Its own: the decode step captured with these rows replays on them for its life.
            self.counters = ops.decode_counters(rows, kv_heads, device)
            # The shared contexts' tables (ops.shared_context_attention), an entry per at most
            # readers_per_entry rows that read one context; at most one entry a row.
            self.readers_per_entry = SHARED_QUERY_ROWS // (heads // kv_heads)
            self.context_addresses = torch.zeros(num_layers, 2, rows, dtype=torch.int64, device=device)
            self.context_capacities = torch.zeros(rows, dtype=torch.int64, device=device)
            self.context_lengths, self.context_readers, self.context_first_reader, self.reader_rows = (
                torch.zeros(rows, dtype=torch.int32, device=device) for _ in range(4))
            self.context_splits = _decode_splits(device, capacity, kv_heads, 1)

    def hold(self, arenas: list[_C.KVArena], prefixes: list[tuple[_C.KVArena, int] | None] | None = None) -> None:
        """Row i now decodes arenas[i] (at most `rows` of them), after prefixes[i] where
        given: the first keys of another arena, (arena, length), that its request reads."""
        prefixes = prefixes or [None] * len(arenas)
        if arenas == self.arenas and prefixes == self.prefixes:
            return
        if len(arenas) > self.rows or (not self.kernel and len(arenas) != self.rows):
            raise ValueError(f"{len(arenas)} requests for a decode step of {self.rows} rows")
        if any(a.num_layers != self.num_layers for a in arenas):
            raise ValueError(f"arenas decoded together must hold the model's {self.num_layers} layers")
        self.arenas, self.prefixes = list(arenas), list(prefixes)
        self.readers, self.first_keys = self._shared_reads()
        if not self.kernel:
            return
        padding = [arenas[0]] * (self.rows - len(arenas))  # never read: their length is 0
        addresses = [[[a.slots(layer)[kv].data_ptr() for a in arenas + padding] for kv in (0, 1)]
                     for layer in range(self.num_layers)]
        lengths = [a.device_length.data_ptr() for a in arenas] + [self.empty_length.data_ptr()] * len(padding)
        self.addresses.copy_(torch.tensor(addresses, dtype=torch.int64))
        self.lengths.copy_(torch.tensor(lengths, dtype=torch.int64))
        self.capacities.copy_(torch.tensor([a.capacity for a in arenas + padding], dtype=torch.int64))
        self.first_key_table.copy_(torch.tensor(self.first_keys + [0] * len(padding), dtype=torch.int64))
        self.active.fill_(len(arenas))
        if self.readers:
            self._hold_contexts(self.readers)

    def _hold_contexts(self, readers: dict[tuple[_C.KVArena, int], list[int]]) -> None:
        """The shared contexts' tables: an entry per context and at most readers_per_entry of
        its rows; entries past them have no readers."""
        per = self.readers_per_entry
        entries = [(context, length, rows[i:i + per]) for (context, length), rows in readers.items()
                   for i in range(0, len(rows), per)]
        unused = self.rows - len(entries)
        reader_rows = [row for _, _, rows in entries for row in rows]
        first = [sum(len(rows) for _, _, rows in entries[:e]) for e in range(len(entries))]
        self.context_addresses.copy_(torch.tensor(
            [[[context.slots(layer)[kv].data_ptr() for context, _, _ in entries] + [0] * unused for kv in (0, 1)]
             for layer in range(self.num_layers)], dtype=torch.int64))
        self.context_capacities.copy_(torch.tensor([c.capacity for c, _, _ in entries] + [0] * unused))
        int32 = functools.partial(torch.tensor, dtype=torch.int32)
        self.context_lengths.copy_(int32([length for _, length, _ in entries] + [0] * unused))
        self.context_readers.copy_(int32([len(rows) for _, _, rows in entries] + [0] * unused))
        self.context_first_reader.copy_(int32(first + [0] * unused))
        self.reader_rows.copy_(int32(reader_rows + [0] * (self.rows - len(reader_rows))))

    @property
    def reads_shared(self) -> bool:
        """Whether rows held read a shared context (the step then launches its kernel)."""
        return bool(self.readers)

    def release(self) -> None:
        """Holds no arena (their memory may go); the next hold rewrites the tables."""
        self.arenas, self.prefixes, self.readers, self.first_keys = [], [], {}, []

    def add_token(self) -> None:
        """Each request held counts the slot of the token fed now (the query rank's step)."""
        if self.kernel:
            ops.add_token_rows(self.lengths, self.active)
        else:
            for arena in self.arenas:
                arena.add_token()

    def write_token(self, layer: int, k: Tensor, v: Tensor) -> None:
        """Row i's k, v (of k, v [KV, rows, D]) into the slot its arena counted last."""
        if not self.kernel:
            for i, arena in enumerate(self.arenas):
                arena.write_token(layer, k[:, i:i + 1], v[:, i:i + 1])
            return
        ops.kv_append_rows(k, v, self.addresses[layer, 0], self.addresses[layer, 1], self.lengths, self.capacities)

    def attend(self, layer: int, q: Tensor) -> tuple[Tensor, Tensor]:
        """q [H, rows, D], row i over the keys its arena counts, after its shared context's:
        o [H, rows, D], lse [H, rows]."""
        if self.kernel:
            o, lse = ops.decode_attention_rows(q, self.addresses[layer, 0], self.addresses[layer, 1], self.lengths,
                                               self.capacities, self.first_key_table, self.kv_heads, self.splits,
                                               self.counters)
            if self.reads_shared:
                ops.shared_context_attention(q, o, lse, self.context_addresses[layer, 0],
                                             self.context_addresses[layer, 1], self.context_capacities,
                                             self.context_lengths, self.context_readers, self.context_first_reader,
                                             self.reader_rows, self.kv_heads, self.context_splits)
            return o, lse
        parts = []
        for i, (arena, first) in enumerate(zip(self.arenas, self.first_keys)):
            keys, values = arena.slots(layer)
            n = int(arena.device_length)
            parts.append(local_attention_lse(q[:, i:i + 1], keys[:, first:n], values[:, first:n], causal=False))
        o = torch.cat([o for o, _ in parts], 1) if len(parts) > 1 else parts[0][0]
        lse = torch.cat([lse for _, lse in parts], 1) if len(parts) > 1 else parts[0][1]
        for (context, length), rows in self.readers.items():
            # The shared context's keys read once for all the rows that read it, all their
            # heads together, then each row's own keys merged in.
            context_keys, context_values = context.slots(layer)
            shared_o, shared_lse = local_attention_lse(q[:, rows], context_keys[:, :length],
                                                       context_values[:, :length], causal=False)
            o[:, rows], lse[:, rows] = merge_into(shared_o, shared_lse, o[:, rows], lse[:, rows])
        return o, lse

    def _shared_reads(self) -> tuple[dict[tuple[_C.KVArena, int], list[int]], list[int]]:
        """The rows that read each context an arena holds for other rows too, by (that arena,
        its length): those rows, and the row of the arena itself where it is held, which then
        attends only to its keys after the context; and each row's first key of its arena."""
        readers: dict[tuple[_C.KVArena, int], list[int]] = {}
        for i, prefix in enumerate(self.prefixes):
            if prefix is not None and prefix[1] > 0:
                readers.setdefault(prefix, []).append(i)
        first_keys = [0] * len(self.arenas)
        for (context, length), rows in readers.items():
            holder = next((i for i, arena in enumerate(self.arenas) if arena is context), None)
            if holder is not None:
                rows.insert(0, holder)
                first_keys[holder] = length
        return readers, first_keys


@functools.cache
def _decode_splits(device: torch.device, capacity: int, kv_heads: int, rows: int) -> int:
    multiprocessors = torch.cuda.get_device_properties(device).multi_processor_count
    return ops.decode_splits(capacity, kv_heads, multiprocessors, rows)
