// CUDA kernels of star_engine, on raw device pointers and a stream (no PyTorch), so that
// they compile wherever nvcc is, and every launch can be captured in a CUDA graph.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace star {

// Element types the kernels take: float, __half or __nv_bfloat16 (cuda_fp16.h / cuda_bf16.h).
enum class DType { kFloat32, kFloat16, kBFloat16 };

// Log-sum-exp merge of W partial attention results (see ../lse_merge.h), on `stream`.
// o_parts of type in_dtype, o_out of type out_dtype; lse in float32.
void lse_merge_cuda(const void* o_parts, int64_t o_part_stride, DType in_dtype,
                    const float* lse_parts, int64_t lse_part_stride, int parts, int64_t rows,
                    int dim, void* o_out, DType out_dtype, float* lse_out, cudaStream_t stream);

// Where each row of a batched decode finds its cache: device arrays [rows] of addresses
// (one layer's K and V of the row's arena, its int32 length), of the arena's capacity
// (rows of one arena may differ: a request that reads a shared context holds only its
// tail) and of the first key the row attends to (non-zero where the arena's first keys
// are a context that the shared-context kernel reads for this row and others; attention
// only, a token is written at the length). All null: one row, at the pointers and
// capacity given beside, from key 0.
struct DecodeRows {
  const int64_t* k = nullptr;
  const int64_t* v = nullptr;
  const int64_t* length = nullptr;
  const int64_t* capacity = nullptr;
  const int64_t* first_key = nullptr;
};

// Attention of one query token (all heads) per row over a KV cache laid out [kv_heads,
// capacity, head_dim] per layer, of which the first *length tokens are used. `length` lives
// in device memory, so that a captured graph replays correctly as the cache grows. Row r's
// query is q + r * q_row_stride ([heads, head_dim], heads head_dim apart); its cache and
// length are k_cache, v_cache, length for a single row, or `rows`' entries. Grouped-query
// heads: query head h reads kv head h / (heads / kv_heads), at most 8 per kv head. The keys
// are split over `splits` blocks per kv head (1..256), whose partial results go to
// `workspace` (batch_rows * decode_workspace_floats) and are merged in the same launch by
// the last block of each kv head; `counters` ([batch_rows * kv_heads] int32, zero before the
// first call) count the finished blocks and are left at zero. Writes o [heads, batch_rows,
// head_dim] (dtype) and lse [heads, batch_rows] (float32, natural log); no keys give o = 0,
// lse = -inf. head_dim 64 or 128; dtype float16 or bfloat16; compute capability 8.0 or newer
// (tensor-core mma).
void decode_attention_cuda(const void* q, int64_t q_row_stride, const void* k_cache,
                           const void* v_cache, int64_t capacity, const int32_t* length,
                           DecodeRows rows, int batch_rows, int heads, int kv_heads, int head_dim,
                           float scale, DType dtype, int splits, float* workspace,
                           int32_t* counters, void* o, float* lse, cudaStream_t stream);

int64_t decode_workspace_floats(int heads, int head_dim, int splits);

// Contexts that several rows of a batched decode read, held once: entry e is one layer's
// K and V of the arena that holds it (addresses k[e], v[e], laid out [kv_heads,
// capacity[e], head_dim]), of which the first length[e] keys count, and the rows that read
// it, reader_rows[first_reader[e] .. first_reader[e] + readers[e]). Device arrays: k, v,
// capacity int64 [entries]; length, readers, first_reader int32 [entries]; reader_rows
// int32 [batch rows]. An entry of 0 readers is unused. A row reads at most one entry.
struct SharedContexts {
  const int64_t* k = nullptr;
  const int64_t* v = nullptr;
  const int64_t* capacity = nullptr;
  const int32_t* length = nullptr;
  const int32_t* readers = nullptr;
  const int32_t* first_reader = nullptr;
  const int32_t* reader_rows = nullptr;
};
// Query heads of one kv head over one entry that one launch takes: readers x group.
constexpr int kMaxSharedQueryRows = 128;

// Adds to each reader row's attention over its own keys (o [heads, batch_rows, head_dim]
// and lse [heads, batch_rows], decode_attention's output, merged in place) its attention
// over the shared context it reads: for each entry and kv head, the query heads of all its
// readers (readers x group <= kMaxSharedQueryRows) read the context's keys once, as the rows
// of one matrix product, over `splits` blocks whose parts go to `workspace`
// (shared_context_workspace_floats) and are merged with o, lse by a second launch. q as
// for decode_attention (row r at q + r * q_row_stride). head_dim 64 or 128; dtype float16
// or bfloat16.
void shared_context_attention_cuda(const void* q, int64_t q_row_stride, SharedContexts contexts,
                                   int entries, int batch_rows, int heads, int kv_heads, int head_dim,
                                   float scale, DType dtype, int splits, float* workspace, void* o,
                                   float* lse, cudaStream_t stream);

int64_t shared_context_workspace_floats(int batch_rows, int heads, int head_dim, int splits);

// Copies one token's k and v rows per batch row ([kv_heads] rows of row_bytes, heads
// src_head_stride_bytes apart, batch rows src_row_stride_bytes apart) into slot *length - 1
// of a cache laid out [kv_heads, capacity, row]: k_cache, v_cache, length for one row, or
// `rows`' entries. row_bytes must be a multiple of 16 and the rows 16-byte aligned.
void kv_append_cuda(const void* k, const void* v, int64_t src_head_stride_bytes,
                    int64_t src_row_stride_bytes, void* k_cache, void* v_cache, int64_t capacity,
                    const int32_t* length, DecodeRows rows, int batch_rows, int kv_heads,
                    int row_bytes, cudaStream_t stream);

// Counts one more token in each of the first *active (device memory) of `rows` lengths,
// int32 values at the addresses lengths[r]: the slot a decode step of those rows writes.
void add_token_rows_cuda(const int64_t* lengths, const int32_t* active, int rows, cudaStream_t stream);

// The per-token work of a decoder layer (layer_ops.cu), on contiguous rows of dtype:
// y [rows, dim] = weight * RMSNorm(x) (dim a multiple of 8, rows 16-byte aligned); x [tokens, heads, dim] (heads dim apart, tokens
// token_stride apart) rotated in place by cos, sin [tokens, dim] (float32); out [tokens,
// inner] = silu(gate) * up of gate_up [tokens, 2 * inner]. head_dim up to 2048.
void rms_norm_cuda(const void* x, const void* weight, void* y, int64_t rows, int dim, float eps,
                   DType dtype, cudaStream_t stream);
void rope_cuda(void* x, int64_t tokens, int64_t token_stride, int heads, int dim, const float* cos,
               const float* sin, DType dtype, cudaStream_t stream);
void silu_mul_cuda(const void* gate_up, void* out, int64_t tokens, int inner, DType dtype,
                   cudaStream_t stream);

// A split count for keys of up to `capacity` tokens that fills `multiprocessors` with
// rows * kv_heads * splits blocks.
int decode_splits(int64_t capacity, int kv_heads, int multiprocessors, int rows);

// Writes `value` to *slot, host memory mapped into the device, once the work enqueued
// before it on `stream` is done: a host thread can then follow the stream by reading
// memory, without a CUDA call (which could wait behind a kernel that never ends).
void signal_progress_cuda(uint64_t* slot, uint64_t value, cudaStream_t stream);

// Every rank's exchange buffer, mapped into this process (own included), for the one-shot
// gather + merge over peer memory (peer_gather.cu). A buffer holds 2 x world slots of
// slot_bytes (two parities, one slot per rank); a slot holds a part of up to slot_bytes / 2
// (each 4-byte word beside the number of the call that wrote it).
constexpr int kMaxPeers = 8;
constexpr int kMaxRows = 256;
struct PeerBuffers {
  char* base[kMaxPeers];
};

// Sends this rank's packed part (rows x dim of dtype, then rows float32 lse; at most
// slot_bytes / 2, kMaxRows rows) to every rank and merges everyone's into o_out, lse_out, in one
// launch on `stream`. `epoch` (device memory, 0 at first) counts the calls and must be the
// same on every rank; every rank makes the same calls in the same order. A rank that waits
// longer than timeout_s for the others sets *failed (mapped host memory) and goes on.
void peer_gather_merge_cuda(const PeerBuffers& peers, int rank, int world, int64_t slot_bytes,
                            const void* part, int64_t part_bytes, int64_t rows, int dim,
                            DType dtype, uint32_t* epoch, double timeout_s, int* failed,
                            void* o_out, float* lse_out, cudaStream_t stream);

// Throws std::runtime_error with the CUDA error's text if the last launch failed.
void check_cuda(cudaError_t status, const char* what);

}  // namespace star
