// PyTorch glue of the CUDA kernels and the NCCL communicator: shape checks, the current
// stream, and the tensor <-> pointer step. Built only when PyTorch has CUDA.
#include "cuda_glue.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <cmath>

#include "cuda/kernels.h"
#include "nccl_comm.h"
#include "peer_exchange.h"

namespace star {

namespace {

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "unsupported dtype ", t.scalar_type());
  }
}

ncclDataType_t nccl_type(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return ncclFloat32;
    case at::kHalf: return ncclFloat16;
    case at::kBFloat16: return ncclBfloat16;
    default: TORCH_CHECK(false, "NCCL reductions take float32, float16 or bfloat16, not ", t.scalar_type());
  }
}

cudaStream_t current_stream(const at::Tensor& t) {
  return at::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

void check_cuda_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be on a GPU");
}

// One rank's part of gather_merge: o's rows (own dtype), then their float32 lse, in one
// buffer. Returned as is where lse already follows o (decode_attention's output); else
// packed into `storage` by two copies on the stream.
const void* packed_part(const at::Tensor& o, const at::Tensor& lse, at::Tensor& storage) {
  TORCH_CHECK(o.is_contiguous() && lse.is_contiguous() && lse.scalar_type() == at::kFloat,
              "gather_merge: contiguous o and float32 lse");
  const int64_t rows = lse.numel(), o_bytes = o.nbytes();
  TORCH_CHECK(o.numel() == rows * o.size(-1), "gather_merge: o does not match lse");
  TORCH_CHECK(o_bytes % 4 == 0, "gather_merge: o must fill whole 4-byte words");
  if (static_cast<const char*>(lse.data_ptr()) == static_cast<const char*>(o.data_ptr()) + o_bytes) {
    return o.data_ptr();
  }
  const cudaStream_t stream = current_stream(o);
  storage = at::empty({o_bytes + 4 * rows}, o.options().dtype(at::kByte));
  check_cuda(cudaMemcpyAsync(storage.data_ptr(), o.data_ptr(), o_bytes, cudaMemcpyDeviceToDevice, stream),
             "pack o");
  check_cuda(cudaMemcpyAsync(static_cast<char*>(storage.data_ptr()) + o_bytes, lse.data_ptr(), 4 * rows,
                             cudaMemcpyDeviceToDevice, stream),
             "pack lse");
  return storage.data_ptr();
}

}  // namespace

void lse_merge_gpu(const at::Tensor& o_parts, const at::Tensor& lse_parts, at::Tensor& o,
                   at::Tensor& lse) {
  check_cuda_tensor(o_parts, "o_parts");
  const c10::cuda::CUDAGuard guard(o_parts.device());
  lse_merge_cuda(o_parts.data_ptr(), o_parts.stride(0), dtype_of(o_parts),
                 lse_parts.data_ptr<float>(), lse_parts.stride(0),
                 static_cast<int>(o_parts.size(0)), o_parts.size(1),
                 static_cast<int>(o_parts.size(2)), o.data_ptr(), dtype_of(o),
                 lse.data_ptr<float>(), current_stream(o_parts));
}

namespace {

// o [heads, rows, dim] (q's dtype) and lse [heads, rows] (float32) in one buffer, lse right
// after o: the message gather_merge sends as is.
std::tuple<at::Tensor, at::Tensor> packed_output(const at::Tensor& q, int64_t heads, int64_t rows,
                                                 int64_t dim) {
  const int64_t o_bytes = heads * rows * dim * q.element_size();
  at::Tensor packed = at::empty({o_bytes + 4 * heads * rows}, q.options().dtype(at::kByte));
  at::Tensor o = packed.narrow(0, 0, o_bytes).view(q.scalar_type()).view({heads, rows, dim});
  at::Tensor lse = packed.narrow(0, o_bytes, 4 * heads * rows).view(at::kFloat).view({heads, rows});
  return {o, lse};
}

// The tables of a batched launch (kernels.h, DecodeRows): int64 [rows] each on q's device;
// first_keys may be absent (every row from key 0).
DecodeRows row_tables(const at::Tensor& q, const at::Tensor& k_rows, const at::Tensor& v_rows,
                      const at::Tensor& lengths, const at::Tensor& capacities, const at::Tensor* first_keys,
                      int64_t rows, const char* what) {
  for (const at::Tensor* t : {&k_rows, &v_rows, &lengths, &capacities, first_keys}) {
    if (t == nullptr) continue;
    TORCH_CHECK(t->is_cuda() && t->device() == q.device() && t->scalar_type() == at::kLong &&
                    t->dim() == 1 && t->numel() == rows && t->is_contiguous(),
                what, ": k_rows, v_rows, lengths, capacities and first_keys must be int64 [rows] on q's device");
  }
  return DecodeRows{k_rows.data_ptr<int64_t>(), v_rows.data_ptr<int64_t>(), lengths.data_ptr<int64_t>(),
                    capacities.data_ptr<int64_t>(), first_keys ? first_keys->data_ptr<int64_t>() : nullptr};
}

// The kernel's split counters: int32 [>= rows x KV heads] on q's device, zero before a
// launch and left at zero by it. The caller owns them, and keeps them as long as any CUDA
// graph that captured a launch with them (a replay writes to them).
void check_counters(const at::Tensor& q, const at::Tensor& counters, int64_t needed, const char* what) {
  TORCH_CHECK(counters.is_cuda() && counters.device() == q.device() && counters.scalar_type() == at::kInt &&
                  counters.is_contiguous() && counters.numel() >= needed,
              what, ": counters must be int32 [>= ", needed, "] (rows x KV heads) on q's device");
}

void launch_decode(const at::Tensor& q, int64_t q_row_stride, const void* k, const void* v,
                   int64_t capacity, const int32_t* length, DecodeRows rows, int64_t batch_rows,
                   int64_t kv_heads, int64_t splits, const at::Tensor& counters, at::Tensor& o,
                   at::Tensor& lse) {
  const int64_t heads = q.size(0), dim = q.size(-1);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor workspace = at::empty({batch_rows * decode_workspace_floats(heads, dim, splits)},
                                   q.options().dtype(at::kFloat));
  decode_attention_cuda(q.data_ptr(), q_row_stride, k, v, capacity, length, rows,
                        static_cast<int>(batch_rows), static_cast<int>(heads),
                        static_cast<int>(kv_heads), static_cast<int>(dim),
                        1.0f / std::sqrt(static_cast<float>(dim)), dtype_of(q),
                        static_cast<int>(splits), workspace.data_ptr<float>(),
                        counters.data_ptr<int32_t>(), o.data_ptr(), lse.data_ptr<float>(),
                        current_stream(q));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> decode_attention(const at::Tensor& q, const at::Tensor& k,
                                                    const at::Tensor& v, const at::Tensor& length,
                                                    int64_t splits, const at::Tensor& counters) {
  // q [H, D]; k, v [KV, >= length, D] with rows contiguous (views into the KV arena: the
  // stride between heads is the arena's capacity); length: int32 [1] on the GPU.
  for (const at::Tensor* t : {&q, &k, &v, &length}) check_cuda_tensor(*t, "decode_attention input");
  TORCH_CHECK(q.dim() == 2 && k.dim() == 3 && v.sizes() == k.sizes() && v.strides() == k.strides(),
              "decode_attention: q [H, D], k and v [KV, T, D] of one layout");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type(),
              "decode_attention: q, k, v of one dtype");
  const int64_t heads = q.size(0), dim = q.size(1);
  TORCH_CHECK(k.size(2) == dim && q.stride(1) == 1 && q.stride(0) == dim && k.stride(2) == 1 &&
                  k.stride(1) == dim && k.stride(0) % dim == 0,
              "decode_attention: rows of q, k, v must be contiguous");
  TORCH_CHECK(length.scalar_type() == at::kInt && length.numel() == 1,
              "decode_attention: length must be one int32");
  check_counters(q, counters, k.size(0), "decode_attention");
  auto [o, lse] = packed_output(q, heads, 1, dim);
  launch_decode(q, 0, k.data_ptr(), v.data_ptr(), k.stride(0) / dim, length.data_ptr<int32_t>(),
                DecodeRows{}, 1, k.size(0), splits, counters, o, lse);
  return {o.view({heads, dim}), lse.view({heads})};
}

std::tuple<at::Tensor, at::Tensor> decode_attention_rows(const at::Tensor& q, const at::Tensor& k_rows,
                                                         const at::Tensor& v_rows,
                                                         const at::Tensor& lengths, const at::Tensor& capacities,
                                                         const at::Tensor& first_keys, int64_t kv_heads,
                                                         int64_t splits, const at::Tensor& counters) {
  // q [H, rows, D] (heads D apart, each head's row contiguous); row r reads the layer of an
  // arena whose K and V start at k_rows[r], v_rows[r] ([KV, capacities[r], D] each, of q's
  // dtype) and whose int32 length is at lengths[r], from key first_keys[r] on.
  check_cuda_tensor(q, "decode_attention_rows input");
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1 && q.stride(0) == q.size(2),
              "decode_attention_rows: q [H, rows, D] with heads D apart");
  const int64_t rows = q.size(1);
  const DecodeRows tables =
      row_tables(q, k_rows, v_rows, lengths, capacities, &first_keys, rows, "decode_attention_rows");
  check_counters(q, counters, rows * kv_heads, "decode_attention_rows");
  auto [o, lse] = packed_output(q, q.size(0), rows, q.size(2));
  launch_decode(q, q.stride(1), nullptr, nullptr, 0, nullptr, tables, rows, kv_heads, splits, counters, o, lse);
  return {o, lse};
}

void shared_context_attention(const at::Tensor& q, at::Tensor& o, at::Tensor& lse, const at::Tensor& k,
                              const at::Tensor& v, const at::Tensor& capacities, const at::Tensor& lengths,
                              const at::Tensor& readers, const at::Tensor& first_reader,
                              const at::Tensor& reader_rows, int64_t kv_heads, int64_t splits) {
  // q, o [H, rows, D] (heads D apart) and lse [H, rows]: decode_attention_rows' output over
  // each row's own keys, merged in place with each reader's attention over its shared
  // context; entry e's K and V start at k[e], v[e] ([KV, capacities[e], D] each).
  check_cuda_tensor(q, "shared_context_attention input");
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1 && q.stride(0) == q.size(2) && o.is_contiguous() &&
                  o.sizes() == q.sizes() && o.scalar_type() == q.scalar_type() && lse.is_contiguous() &&
                  lse.scalar_type() == at::kFloat && lse.dim() == 2 && lse.size(0) == q.size(0) &&
                  lse.size(1) == q.size(1) && o.device() == q.device() && lse.device() == q.device(),
              "shared_context_attention: q [H, rows, D] with heads D apart, o like q, lse [H, rows] float32");
  const int64_t entries = k.numel(), rows = q.size(1), heads = q.size(0), dim = q.size(2);
  for (const at::Tensor* t : {&k, &v, &capacities}) {
    TORCH_CHECK(t->device() == q.device() && t->scalar_type() == at::kLong && t->dim() == 1 &&
                    t->numel() == entries && t->is_contiguous(),
                "shared_context_attention: k, v and capacities must be int64 [entries] on q's device");
  }
  for (const at::Tensor* t : {&lengths, &readers, &first_reader}) {
    TORCH_CHECK(t->device() == q.device() && t->scalar_type() == at::kInt && t->dim() == 1 &&
                    t->numel() == entries && t->is_contiguous(),
                "shared_context_attention: lengths, readers and first_reader must be int32 [entries] on q's device");
  }
  TORCH_CHECK(reader_rows.device() == q.device() && reader_rows.scalar_type() == at::kInt &&
                  reader_rows.dim() == 1 && reader_rows.numel() == rows && reader_rows.is_contiguous(),
              "shared_context_attention: reader_rows must be int32 [rows] on q's device");
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor workspace = at::empty({shared_context_workspace_floats(rows, heads, dim, splits)},
                                   q.options().dtype(at::kFloat));
  const SharedContexts contexts{k.data_ptr<int64_t>(), v.data_ptr<int64_t>(), capacities.data_ptr<int64_t>(),
                                lengths.data_ptr<int32_t>(), readers.data_ptr<int32_t>(),
                                first_reader.data_ptr<int32_t>(), reader_rows.data_ptr<int32_t>()};
  shared_context_attention_cuda(q.data_ptr(), q.stride(1), contexts, static_cast<int>(entries),
                                static_cast<int>(rows), static_cast<int>(heads), static_cast<int>(kv_heads),
                                static_cast<int>(dim), 1.0f / std::sqrt(static_cast<float>(dim)), dtype_of(q),
                                static_cast<int>(splits), workspace.data_ptr<float>(), o.data_ptr(),
                                lse.data_ptr<float>(), current_stream(q));
}

void kv_append_rows(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_rows,
                    const at::Tensor& v_rows, const at::Tensor& lengths, const at::Tensor& capacities) {
  // k, v [KV, rows, D]: row r's token goes to slot lengths[r] - 1 of the layer whose K and V
  // start at k_rows[r], v_rows[r] ([KV, capacities[r], D] each, of k's dtype).
  check_cuda_tensor(k, "kv_append_rows input");
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes() && v.strides() == k.strides() && k.stride(2) == 1 &&
                  v.scalar_type() == k.scalar_type() && v.device() == k.device(),
              "kv_append_rows: k and v [KV, rows, D] of one layout");
  const int64_t rows = k.size(1), row_bytes = k.size(2) * k.element_size();
  TORCH_CHECK(row_bytes % 16 == 0 && (k.stride(0) * k.element_size()) % 16 == 0 &&
                  (k.stride(1) * k.element_size()) % 16 == 0,
              "kv_append_rows: rows must be multiples of 16 bytes");
  const DecodeRows tables = row_tables(k, k_rows, v_rows, lengths, capacities, nullptr, rows, "kv_append_rows");
  const c10::cuda::CUDAGuard guard(k.device());
  kv_append_cuda(k.data_ptr(), v.data_ptr(), k.stride(0) * k.element_size(), k.stride(1) * k.element_size(),
                 nullptr, nullptr, 0, nullptr, tables, static_cast<int>(rows), static_cast<int>(k.size(0)), static_cast<int>(row_bytes),
                 current_stream(k));
}

void add_token_rows(const at::Tensor& lengths, const at::Tensor& active) {
  // lengths: int64 addresses [rows] of int32 lengths; active: int32 [1], the rows counted.
  check_cuda_tensor(lengths, "add_token_rows input");
  TORCH_CHECK(lengths.scalar_type() == at::kLong && lengths.dim() == 1 && lengths.is_contiguous() &&
                  active.is_cuda() && active.device() == lengths.device() &&
                  active.scalar_type() == at::kInt && active.numel() == 1,
              "add_token_rows: int64 addresses [rows] and an int32 [1] count on one GPU");
  const c10::cuda::CUDAGuard guard(lengths.device());
  add_token_rows_cuda(lengths.data_ptr<int64_t>(), active.data_ptr<int32_t>(),
                      static_cast<int>(lengths.numel()), current_stream(lengths));
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_cuda_tensor(x, "rms_norm input");
  TORCH_CHECK(x.is_contiguous() && weight.dim() == 1 && weight.is_contiguous() &&
                  x.size(-1) == weight.size(0) && weight.scalar_type() == x.scalar_type() &&
                  weight.device() == x.device() && x.size(-1) % 8 == 0,
              "rms_norm: contiguous x [..., dim] (dim a multiple of 8) and a weight [dim] of its "
              "dtype and device");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(x);
  rms_norm_cuda(x.data_ptr(), weight.data_ptr(), y.data_ptr(), x.numel() / x.size(-1),
                static_cast<int>(x.size(-1)), static_cast<float>(eps), dtype_of(x), current_stream(x));
  return y;
}

void rope_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&x, &cos, &sin}) check_cuda_tensor(*t, "rope_ input");
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.stride(1) == x.size(2) && x.size(2) % 2 == 0 &&
                  x.size(2) <= 2048,
              "rope_: x must be [tokens, heads, head_dim <= 2048] with contiguous heads");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && cos.sizes() == sin.sizes() && cos.dim() == 2 &&
                  cos.size(0) == x.size(0) && cos.size(1) == x.size(2) && cos.is_contiguous() &&
                  sin.is_contiguous(),
              "rope_: cos and sin must be float32 [tokens, head_dim]");
  const c10::cuda::CUDAGuard guard(x.device());
  rope_cuda(x.data_ptr(), x.size(0), x.stride(0), static_cast<int>(x.size(1)),
            static_cast<int>(x.size(2)), cos.data_ptr<float>(), sin.data_ptr<float>(), dtype_of(x),
            current_stream(x));
}

at::Tensor silu_mul(const at::Tensor& gate_up) {
  check_cuda_tensor(gate_up, "silu_mul input");
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.is_contiguous() && gate_up.size(1) % 2 == 0,
              "silu_mul: gate_up must be contiguous [tokens, 2 * inner]");
  const c10::cuda::CUDAGuard guard(gate_up.device());
  const int64_t inner = gate_up.size(1) / 2;
  at::Tensor out = at::empty({gate_up.size(0), inner}, gate_up.options());
  silu_mul_cuda(gate_up.data_ptr(), out.data_ptr(), gate_up.size(0), static_cast<int>(inner),
                dtype_of(gate_up), current_stream(gate_up));
  return out;
}

void register_cuda_bindings(pybind11::module& m) {
  m.def("rms_norm", &rms_norm, pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("eps"),
        "weight * RMSNorm(x) over the last dimension, rounding where the PyTorch ops do.");
  m.def("rope_", &rope_, pybind11::arg("x"), pybind11::arg("cos"), pybind11::arg("sin"),
        "Rotates x [tokens, heads, head_dim] in place (halves convention), in float32.");
  m.def("silu_mul", &silu_mul, pybind11::arg("gate_up"),
        "silu(gate) * up of gate_up [tokens, 2 * inner].");
  m.def("decode_attention", &decode_attention, pybind11::arg("q"), pybind11::arg("k"),
        pybind11::arg("v"), pybind11::arg("length"), pybind11::arg("splits"), pybind11::arg("counters"),
        "One-token attention over a KV cache: (o [H, D], lse [H]).");
  m.def("decode_attention_rows", &decode_attention_rows, pybind11::arg("q"), pybind11::arg("k_rows"),
        pybind11::arg("v_rows"), pybind11::arg("lengths"), pybind11::arg("capacities"), pybind11::arg("first_keys"),
        pybind11::arg("kv_heads"), pybind11::arg("splits"), pybind11::arg("counters"),
        "One token per row over each row's own KV cache (addresses per row): (o [H, rows, D], lse [H, rows]).");
  m.def("shared_context_attention", &shared_context_attention, pybind11::arg("q"), pybind11::arg("o"),
        pybind11::arg("lse"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("capacities"),
        pybind11::arg("lengths"), pybind11::arg("readers"), pybind11::arg("first_reader"),
        pybind11::arg("reader_rows"), pybind11::arg("kv_heads"), pybind11::arg("splits"),
        "Merges into o, lse each reader row's attention over the shared context it reads, read once for all its readers.");
  m.def("kv_append_rows", &kv_append_rows, pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("k_rows"),
        pybind11::arg("v_rows"), pybind11::arg("lengths"), pybind11::arg("capacities"),
        "Writes row r's token of k, v [KV, rows, D] into the slot its length names in its own cache.");
  m.def("add_token_rows", &add_token_rows, pybind11::arg("lengths"), pybind11::arg("active"),
        "Adds one to each of the first active int32 lengths at the addresses given.");
  m.def("decode_splits", &decode_splits, pybind11::arg("capacity"), pybind11::arg("kv_heads"),
        pybind11::arg("multiprocessors"), pybind11::arg("rows") = 1);

  pybind11::class_<NcclComm>(m, "NcclComm")
      .def(pybind11::init<const std::string&, int, int, int, double>(), pybind11::arg("unique_id"),
           pybind11::arg("rank"), pybind11::arg("world"), pybind11::arg("device"),
           pybind11::arg("timeout_s"))
      .def_static("make_unique_id",
                  [] { return pybind11::bytes(NcclComm::make_unique_id()); })
      .def("gather_merge",
           [](NcclComm& self, const at::Tensor& o, const at::Tensor& lse) {
             // Pack (o rows, then their float32 lse), all-gather, merge.
             at::Tensor storage;
             const void* send = packed_part(o, lse, storage);
             const int64_t rows = lse.numel(), dim = o.size(-1), o_bytes = o.nbytes();
             const int64_t part = o_bytes + 4 * rows;
             const cudaStream_t stream = current_stream(o);
             at::Tensor recv = at::empty({self.world(), part}, o.options().dtype(at::kByte));
             self.all_gather(send, recv.data_ptr(), part, stream);
             at::Tensor merged_o = at::empty_like(o);
             at::Tensor merged_lse = at::empty_like(lse);
             char* base = static_cast<char*>(recv.data_ptr());
             lse_merge_cuda(base, part / o.element_size(), dtype_of(o),
                            reinterpret_cast<const float*>(base + o_bytes), part / 4, self.world(),
                            rows, static_cast<int>(dim), merged_o.data_ptr(), dtype_of(o),
                            merged_lse.data_ptr<float>(), stream);
             return std::make_tuple(merged_o, merged_lse);
           })
      .def("broadcast",
           [](NcclComm& self, at::Tensor& buffer, int root) {
             TORCH_CHECK(buffer.is_contiguous(), "broadcast: contiguous buffer");
             self.broadcast(buffer.data_ptr(), buffer.nbytes(), root, current_stream(buffer));
           })
      .def("all_reduce_sum",
           [](NcclComm& self, at::Tensor& buffer) {
             TORCH_CHECK(buffer.is_cuda() && buffer.is_contiguous(), "all_reduce_sum: contiguous GPU buffer");
             self.all_reduce_sum(buffer.data_ptr(), buffer.numel(), nccl_type(buffer), current_stream(buffer));
           })
      .def("all_gather",
           [](NcclComm& self, const at::Tensor& send, at::Tensor& recv) {
             TORCH_CHECK(send.is_cuda() && send.is_contiguous() && recv.is_contiguous() &&
                             recv.nbytes() == send.nbytes() * self.world(),
                         "all_gather: contiguous buffers, recv world times send");
             self.all_gather(send.data_ptr(), recv.data_ptr(), send.nbytes(), current_stream(send));
           })
      .def("send_recv",
           [](NcclComm& self, const at::Tensor& send, int dst, at::Tensor& recv, int src) {
             TORCH_CHECK(send.is_contiguous() && recv.is_contiguous() &&
                             send.nbytes() == recv.nbytes(),
                         "send_recv: contiguous buffers of one size");
             self.send_recv(send.data_ptr(), dst, recv.data_ptr(), src, send.nbytes(),
                            current_stream(send));
           })
      .def("wait",
           [](NcclComm& self, int device, const std::string& what) {
             pybind11::gil_scoped_release release;
             self.wait(at::cuda::getCurrentCUDAStream(device).stream(), what);
           },
           pybind11::arg("device"), pybind11::arg("what"),
           "Waits for the device's current stream, at most the timeout; `what`: its work, for the error.")
      .def_property_readonly("timeout_s", &NcclComm::timeout_s)
      .def_property_readonly("failed", &NcclComm::failed)
      .def_property_readonly("rank", &NcclComm::rank)
      .def_property_readonly("world", &NcclComm::world);

  pybind11::class_<PeerExchange>(m, "PeerExchange")
      .def(pybind11::init<int, int, int, int64_t, double>(), pybind11::arg("rank"),
           pybind11::arg("world"), pybind11::arg("device"), pybind11::arg("slot_bytes"),
           pybind11::arg("timeout_s"))
      .def("handle", [](const PeerExchange& self) { return pybind11::bytes(self.handle()); })
      .def("connect", &PeerExchange::connect, pybind11::arg("handles"))
      .def("gather_merge",
           [](PeerExchange& self, const at::Tensor& o, const at::Tensor& lse) {
             at::Tensor storage;
             const void* part = packed_part(o, lse, storage);
             at::Tensor merged_o = at::empty_like(o);
             at::Tensor merged_lse = at::empty_like(lse);
             self.gather_merge(part, o.nbytes() + 4 * lse.numel(), lse.numel(),
                               static_cast<int>(o.size(-1)), dtype_of(o), merged_o.data_ptr(),
                               merged_lse.data_ptr<float>(), current_stream(o));
             return std::make_tuple(merged_o, merged_lse);
           })
      .def("check", &PeerExchange::check)
      .def("slot_holds",
           [](const PeerExchange& self, const at::Tensor& o, const at::Tensor& lse) {
             return self.slot_holds(o.nbytes() + 4 * lse.numel(), lse.numel());
           },
           "Whether this (o, float32 lse) goes through the exchange.");
}

}  // namespace star
