"""The extension's CUDA kernels against float64 references on the CPU."""

from __future__ import annotations

import sys

import pytest
import torch

from star_engine import _C, ops
from star_engine.config import PRESETS
from tests.launcher import run
from tests.reference import naive_attention

pytestmark = pytest.mark.skipif(not ops.WITH_CUDA, reason="extension built without CUDA")
GPU = torch.device("cuda")


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_errors_raised_in_the_extension_reach_python_whole(device):
    """A full arena and a tensor of the wrong shape raise (ArenaFullError, RuntimeError) in
    the CUDA build as in the CPU one, their numbers in the message. The messages are
    formatted with C++ streams, which crash or come out cut short where the extension holds
    its own static copy of libstdc++ (a GCC without the shared one, which CMakeLists.txt
    works around); in a child process, so that a crash fails this test, not the suite."""
    code = f"""
import torch
from star_engine import _C
arena = _C.KVArena(1, 8, 128, 32, torch.bfloat16, torch.device({device!r}))
kv = torch.zeros(8, 64, 128, dtype=torch.bfloat16, device={device!r})
for call in (lambda: arena.append(0, kv, kv), lambda: arena.append(0, kv[0], kv)):
    try:
        call()
    except RuntimeError as exc:
        print(type(exc).__name__, exc)
"""
    result = run([sys.executable, "-c", code], timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    full, wrong_shape = result.stdout.splitlines()
    assert full == "ArenaFullError KV arena full: layer 0 holds 0 of 32 tokens, cannot append 64"
    assert wrong_shape.startswith("RuntimeError KVArena.append: expected [8, n, 128], got [64, 128]")


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double().cpu() - want).norm() / want.norm()).item()


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality: an arena's unwritten slots are uninitialised memory, which may
    hold NaN patterns left by earlier tests, and NaN is not equal to itself."""
    return torch.equal(a.view(torch.int16), b.view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lengths", [[5, 9, 1, 7], [4, 0, 6], [0, 0]])
def test_merge_kernel_equals_cpu_merge(dtype, lengths):
    gen = torch.Generator().manual_seed(len(lengths))
    parts, rows, dim = len(lengths), 37, 128
    o = torch.randn(parts, rows, dim, generator=gen).to(dtype)
    lse = torch.randn(parts, rows, generator=gen) * 5
    for w, n in enumerate(lengths):
        if n == 0:
            lse[w] = float("-inf")
            o[w] = float("nan")  # a partition without keys may hold anything
    want_o, want_lse = ops.lse_merge(o.float(), lse)
    got_o, got_lse = ops.lse_merge(o.to(GPU), lse.to(GPU))
    assert got_o.dtype == dtype
    torch.testing.assert_close(got_lse.cpu(), want_lse, atol=1e-5, rtol=1e-5)
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got_o.cpu().float(), want_o, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("heads,kv_heads", [(8, 8), (9, 3), (32, 8), (64, 8)])
@pytest.mark.parametrize("length", [1, 77, 5000, 40000])
def test_decode_kernel_equals_float64_softmax(dtype, dim, heads, kv_heads, length):
    capacity = length + 123  # a view into a larger arena: heads lie capacity rows apart
    gen = torch.Generator().manual_seed(length + heads)
    cache = torch.randn(2, kv_heads, capacity, dim, generator=gen).to(dtype)
    q = torch.randn(heads, dim, generator=gen).to(dtype)
    k, v = cache[0, :, :length], cache[1, :, :length]
    want_o, want_lse = naive_attention(q[:, None], k, v)

    gpu_cache = cache.to(GPU)
    splits = ops.decode_splits(capacity, kv_heads, torch.cuda.get_device_properties(0).multi_processor_count)
    o, lse = ops.decode_attention(q.to(GPU), gpu_cache[0, :, :length], gpu_cache[1, :, :length],
                                 torch.tensor([length], dtype=torch.int32, device=GPU), splits,
                                 ops.decode_counters(1, kv_heads, GPU))
    assert o.dtype == dtype and o.shape == (heads, dim)
    assert relative_error(o, want_o[:, 0]) < 1e-2
    torch.testing.assert_close(lse.cpu().double(), want_lse[:, 0], atol=2e-3, rtol=1e-4)


def test_arena_decoding_on_the_gpu_writes_where_the_device_length_says_even_when_replayed():
    def decoded(device: torch.device) -> _C.KVArena:
        arena = _C.KVArena(2, 3, 64, 8, torch.bfloat16, device)
        gen = torch.Generator().manual_seed(0)
        for layer in range(2):
            arena.append(layer, *(torch.randn(3, 4, 64, generator=gen).bfloat16().to(device) for _ in "kv"))
        tokens = [[torch.randn(3, 1, 64, generator=gen).bfloat16().to(device) for _ in "kv"] for _ in range(3)]
        arena.start_decoding()
        step_kv = [torch.empty_like(t) for t in tokens[0]]

        def step() -> None:
            arena.add_token()
            for layer in range(2):
                arena.write_token(layer, *step_kv)

        graph = None
        for k, v in tokens:
            step_kv[0].copy_(k), step_kv[1].copy_(v)
            if device.type != "cuda" or graph is None:
                step()
                if device.type == "cuda":
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):  # records a step; runs nothing
                        step()
            else:
                graph.replay()
        arena.finish_decoding()
        return arena

    gpu, cpu = decoded(GPU), decoded(torch.device("cpu"))
    assert gpu.length(1) == cpu.length(1) == 7
    for layer in range(2):
        assert torch.equal(gpu.keys(layer).cpu(), cpu.keys(layer))
        assert torch.equal(gpu.values(layer).cpu(), cpu.values(layer))


@pytest.mark.parametrize("heads,kv_heads,dim,requests", [
    (32, 8, 128, 4),
    (9, 3, 64, 4),
    (9, 3, 64, 15),  # 16 rows: few splits, and a row's 9 heads x 65 floats a split not a multiple of 4
])
def test_rows_decoded_together_each_get_what_their_arena_gives_alone(heads, kv_heads, dim, requests):
    """One launch for several requests, each over its own arena and length, counts, writes
    and attends exactly as the one-arena kernels do for each request alone (same splits);
    a padding row writes nothing and attends to nothing."""
    from star_engine.attention.decode import DecodeRows

    gen = torch.Generator().manual_seed(heads)
    lengths, capacity = ([3000, 1, 700, 0] + [50 * i for i in range(1, requests - 3)])[:requests], 3100
    arenas = [_C.KVArena(2, kv_heads, dim, capacity, torch.bfloat16, GPU) for _ in lengths]
    for arena, n in zip(arenas, lengths):
        for layer in range(2):
            arena.append(layer, *(torch.randn(kv_heads, n, dim, generator=gen).bfloat16().to(GPU) for _ in "kv"))
        arena.start_decoding()
    rows = DecodeRows(len(lengths) + 1, 2, heads, kv_heads, dim, capacity, torch.bfloat16, GPU)
    rows.hold(arenas)
    assert rows.kernel
    before = [arena.slots(layer)[kv].clone() for arena in arenas for layer in (0, 1) for kv in (0, 1)]
    rows.add_token()
    # q, k, v as the model makes them: views of one [rows, heads + 2 kv_heads, D] projection.
    qkv = torch.randn(rows.rows, heads + 2 * kv_heads, dim, generator=gen).bfloat16().to(GPU)
    q, k, v = (part.transpose(0, 1) for part in qkv.split([heads, kv_heads, kv_heads], dim=1))
    rows.write_token(1, k, v)
    o, lse = rows.attend(1, q)
    assert o.shape == (heads, rows.rows, dim) and lse.shape == (heads, rows.rows)
    after = [arena.slots(layer)[kv] for arena in arenas for layer in (0, 1) for kv in (0, 1)]
    for i, (arena, n) in enumerate(zip(arenas, lengths)):
        assert int(arena.device_length) == n + 1
        keys, values = arena.slots(1)
        assert torch.equal(keys[:, n], k[:, i]) and torch.equal(values[:, n], v[:, i])
        alone_o, alone_lse = ops.decode_attention(q[:, i].contiguous(), keys, values, arena.device_length, rows.splits,
                                                  ops.decode_counters(1, kv_heads, GPU))
        assert torch.equal(o[:, i], alone_o) and torch.equal(lse[:, i], alone_lse)
        before[4 * i + 2][:, n], before[4 * i + 3][:, n] = k[:, i], v[:, i]  # the one slot written
    assert all(same_bits(a, b) for a, b in zip(after, before))  # nothing else, the padding row's neither
    assert torch.isneginf(lse[:, -1]).all() and (o[:, -1] == 0).all()


# (heads, kv_heads, head_dim, shared context's length, readers' tail lengths, rows that
# share nothing): group sizes x readers from 3 to 128 query rows an entry, lengths that do
# not divide the kernel's 64-key tiles, empty tails, more readers than one entry takes.
SHARED = [
    (32, 8, 128, 1000, [0, 5, 64, 1], [700]),
    (32, 8, 128, 4097, [3] * 32, []),             # with the holder 4 x 33 query rows: two entries
    (9, 3, 64, 333, [0], [10, 0]),                # one reader and the holder: 6 query rows
    (64, 8, 128, 65, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], []),  # 8 x 16 = 128: one entry
    (16, 2, 64, 130, [0, 7, 0, 2, 9, 1, 0, 3] * 2, [1]),  # 8 x 17: two entries
]


@pytest.mark.parametrize("heads,kv_heads,dim,context,tails,alone", SHARED)
def test_rows_that_share_a_context_get_what_each_gets_over_its_context_and_tail_in_one_cache(
        heads, kv_heads, dim, context, tails, alone):
    """The shared-context kernel reads a context once for all the rows that read it, the
    row of the request that holds it (with 5 tokens of its own after it) among them; each
    row's (o, lse) equals, within bf16's rounding, the one-row kernel's over one cache that
    holds the context and then the row's own keys, and float64's."""
    from star_engine.attention.decode import DecodeRows

    gen = torch.Generator().manual_seed(heads + context)
    randn = lambda *shape: torch.randn(*shape, generator=gen).bfloat16().to(GPU)  # noqa: E731
    shared = _C.KVArena(1, kv_heads, dim, context + 100, torch.bfloat16, GPU)
    lengths = [context + 5] + tails + alone
    arenas = [shared] + [_C.KVArena(1, kv_heads, dim, 80 if i < len(tails) else 1000, torch.bfloat16, GPU)
                         for i in range(len(tails) + len(alone))]  # a reader's arena: room for its tail only
    for arena, n in zip(arenas, lengths):
        arena.append(0, randn(kv_heads, n, dim), randn(kv_heads, n, dim))
        arena.start_decoding()
    rows = DecodeRows(len(arenas) + 1, 1, heads, kv_heads, dim, context + 100, torch.bfloat16, GPU)
    rows.hold(arenas, [None] + [(shared, context)] * len(tails) + [None] * len(alone))
    assert rows.kernel and rows.reads_shared and rows.first_keys[0] == context
    qkv = randn(rows.rows, heads + 2 * kv_heads, dim)  # q as the model makes it: a view of the projection
    q = qkv[:, :heads].transpose(0, 1)
    o, lse = rows.attend(0, q)
    context_keys, context_values = shared.slots(0)
    for i, (arena, n) in enumerate(zip(arenas, lengths)):
        keys, values = arena.slots(0)
        keys, values = keys[:, :n], values[:, :n]
        if 1 <= i <= len(tails):
            keys = torch.cat([context_keys[:, :context], keys], 1)
            values = torch.cat([context_values[:, :context], values], 1)
        keys, values = keys.contiguous(), values.contiguous()
        if keys.shape[1] == 0:  # a row alone with no keys yet: nothing to attend to
            assert (o[:, i] == 0).all() and torch.isneginf(lse[:, i]).all(), f"row {i}"
            continue
        length = torch.tensor([keys.shape[1]], dtype=torch.int32, device=GPU)
        one_o, one_lse = ops.decode_attention(q[:, i].contiguous(), keys, values, length, 4,
                                              ops.decode_counters(1, kv_heads, GPU))
        want_o, want_lse = naive_attention(q[:, i:i + 1].cpu(), keys.cpu(), values.cpu())
        assert relative_error(o[:, i], want_o[:, 0]) < 1e-2, f"row {i}"
        assert relative_error(o[:, i], one_o.double().cpu()) < 1e-2, f"row {i}"
        torch.testing.assert_close(lse[:, i].cpu().double(), want_lse[:, 0], atol=2e-3, rtol=1e-4)
        torch.testing.assert_close(lse[:, i], one_lse, atol=2e-3, rtol=1e-4)
    assert torch.isneginf(lse[:, -1]).all() and (o[:, -1] == 0).all()  # the padding row


def test_decode_kernel_reads_the_length_from_device_memory():
    """A captured graph replays with the length of the moment."""
    k = torch.randn(2, 1000, 64, device=GPU, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(4, 64, device=GPU, dtype=torch.bfloat16)
    length = torch.tensor([0], dtype=torch.int32, device=GPU)
    counters = ops.decode_counters(1, 2, GPU)
    for n in (0, 10, 999):
        length.fill_(n)
        o, lse = ops.decode_attention(q, k, v, length, 4, counters)
        if n == 0:
            assert torch.isneginf(lse).all() and (o == 0).all()
        else:
            want_o, want_lse = naive_attention(q[:, None].cpu(), k[:, :n].cpu(), v[:, :n].cpu())
            assert relative_error(o, want_o[:, 0]) < 1e-2
            torch.testing.assert_close(lse.cpu().double(), want_lse[:, 0], atol=2e-3, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_layer_kernels_round_like_the_pytorch_ops_of_the_cpu_path(dtype):
    """RMSNorm, RoPE and the SiLU-gated product: one launch each on a GPU, the eager ops on
    the CPU; they may differ by one rounding step (a bf16 ulp is 2^-8 relative)."""
    from star_engine.model import RMSNorm, Rotary, apply_rope_, silu_mul

    gen = torch.Generator().manual_seed(0)
    ulp = {torch.bfloat16: 2**-7, torch.float16: 2**-10, torch.float32: 1e-5}[dtype]

    norm = RMSNorm(4096, 1e-5)
    norm.weight.data = torch.rand(4096, generator=gen) + 0.5
    norm = norm.to(dtype)
    x = (torch.randn(3, 4096, generator=gen) * 3).to(dtype)
    torch.testing.assert_close(norm.to(GPU)(x.to(GPU)).cpu(), norm.cpu()(x), rtol=ulp, atol=ulp)

    cfg = PRESETS["llama-3.1-8b"]
    cos, sin = Rotary(cfg, torch.device("cpu"))(torch.tensor([0, 5, 70000, 1_000_000]))
    qkv = torch.randn(4, 48, 128, generator=gen).to(dtype)  # rotate 40 of 48 heads, as q and k of qkv
    want = qkv.clone()
    apply_rope_(want[:, :40], cos, sin)
    got = qkv.to(GPU)
    apply_rope_(got[:, :40], cos.to(GPU), sin.to(GPU))
    torch.testing.assert_close(got.cpu(), want, rtol=ulp, atol=ulp)
    assert torch.equal(got[:, 40:].cpu(), qkv[:, 40:])  # v untouched

    gate_up = (torch.randn(5, 2 * 1000, generator=gen) * 4).to(dtype)
    torch.testing.assert_close(silu_mul(gate_up.to(GPU)).cpu(), silu_mul(gate_up), rtol=ulp, atol=ulp)


@pytest.mark.parametrize("backend", ["cudnn", "flash"])
@pytest.mark.parametrize("tq,tk,causal", [(300, 300, True), (64, 1000, True), (1, 777, False), (200, 700, False)])
@pytest.mark.parametrize("heads,kv_heads,dim", [(32, 8, 128), (9, 3, 64)])
def test_fused_attention_backends_equal_float64_softmax(backend, tq, tk, causal, heads, kv_heads, dim):
    from star_engine.attention import backends, local
    from tests.reference import causal_visible

    gen = torch.Generator().manual_seed(tq + tk)
    q, k, v = (torch.randn(n, t, dim, generator=gen).bfloat16().double()
               for n, t in ((heads, tq), (kv_heads, tk), (kv_heads, tk)))
    want_o, want_lse = naive_attention(q, k, v, causal_visible(tq, tk) if causal else None)
    backends.set_backend(backend)
    try:
        o, lse = local.local_attention_lse(*(x.to(GPU, torch.bfloat16) for x in (q, k, v)), causal)
        o_only = local.local_attention(*(x.to(GPU, torch.bfloat16) for x in (q, k, v)), causal)
    finally:
        backends.set_backend("auto")
    assert relative_error(o, want_o) < 1e-2
    assert relative_error(o_only, want_o) < 1e-2
    assert (lse.double().cpu() - want_lse).abs().max().item() < 2e-2


def test_auto_picks_cudnn_attention_on_hopper():
    from star_engine.attention.backends import backend_for

    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("Hopper and later")
    assert backend_for(GPU, torch.bfloat16) == "cudnn"
