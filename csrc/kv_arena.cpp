#include "kv_arena.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <sstream>

#ifdef STAR_ENGINE_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda/kernels.h"
#endif

namespace star {

#ifdef STAR_ENGINE_WITH_CUDA
namespace {

// Writes one token's k, v [KV, 1, D] into slot *length - 1 of a layer's caches [KV,
// capacity, D] (the arena's: contiguous, of k's device and dtype) on the current stream; a
// slot outside the layer is not written.
void write_token_cuda(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& k, const at::Tensor& v,
                      const at::Tensor& length) {
  TORCH_CHECK(v.strides() == k.strides() && k.stride(2) == 1,
              "KVArena.write_token: k and v must have one layout with contiguous rows");
  const int64_t row_bytes = k.size(2) * k.element_size();
  TORCH_CHECK(row_bytes % 16 == 0 && (k.stride(0) * k.element_size()) % 16 == 0,
              "KVArena.write_token: rows must be multiples of 16 bytes");
  const c10::cuda::CUDAGuard guard(k.device());
  kv_append_cuda(k.data_ptr(), v.data_ptr(), k.stride(0) * k.element_size(), 0, k_cache.data_ptr(),
                 v_cache.data_ptr(), k_cache.size(1), length.data_ptr<int32_t>(), DecodeRows{}, 1,
                 static_cast<int>(k.size(0)), static_cast<int>(row_bytes),
                 at::cuda::getCurrentCUDAStream(k.device().index()).stream());
}

}  // namespace
#endif

KVArena::KVArena(int64_t num_layers, int64_t num_kv_heads, int64_t head_dim,
                 int64_t capacity, at::ScalarType dtype, at::Device device)
    : num_layers_(num_layers),
      num_kv_heads_(num_kv_heads),
      head_dim_(head_dim),
      capacity_(capacity),
      lengths_(num_layers, 0) {
  TORCH_CHECK(num_layers > 0 && num_kv_heads > 0 && head_dim > 0,
              "KVArena: layers, kv_heads and head_dim must be positive");
  TORCH_CHECK(capacity >= 0, "KVArena: capacity must be >= 0, got ", capacity);
  TORCH_CHECK(capacity < (int64_t{1} << 31), "KVArena: capacity must fit an int32, got ", capacity);
  storage_ = at::empty({num_layers, 2, num_kv_heads, capacity, head_dim},
                       at::TensorOptions().dtype(dtype).device(device));
  device_length_ = at::zeros({1}, at::TensorOptions().dtype(at::kInt).device(device));
}

void KVArena::check_layer(int64_t layer) const {
  if (layer < 0 || layer >= num_layers_) {
    throw std::out_of_range("KVArena: layer " + std::to_string(layer) + " out of range [0, " +
                            std::to_string(num_layers_) + ")");
  }
}

void KVArena::check_not_decoding(const char* what) const {
  TORCH_CHECK(!decoding_, "KVArena.", what,
              ": the length is on the device while decoding; call finish_decoding() first");
}

at::Tensor KVArena::view(int64_t layer, int64_t kv) const {
  check_layer(layer);
  check_not_decoding(kv == 0 ? "keys" : "values");
  return storage_.select(0, layer).select(0, kv).narrow(1, 0, lengths_[layer]);
}

at::Tensor KVArena::keys(int64_t layer) const { return view(layer, 0); }
at::Tensor KVArena::values(int64_t layer) const { return view(layer, 1); }

int64_t KVArena::length(int64_t layer) const {
  check_layer(layer);
  check_not_decoding("length");
  return lengths_[layer];
}

std::tuple<at::Tensor, at::Tensor> KVArena::slots(int64_t layer) const {
  check_layer(layer);
  at::Tensor layer_kv = storage_.select(0, layer);
  return {layer_kv.select(0, 0), layer_kv.select(0, 1)};
}

void KVArena::append(int64_t layer, const at::Tensor& k, const at::Tensor& v) {
  check_layer(layer);
  check_not_decoding("append");
  for (const at::Tensor* t : {&k, &v}) {
    TORCH_CHECK(t->dim() == 3 && t->size(0) == num_kv_heads_ && t->size(2) == head_dim_,
                "KVArena.append: expected [", num_kv_heads_, ", n, ", head_dim_, "], got ",
                t->sizes());
    TORCH_CHECK(t->device() == storage_.device(), "KVArena.append: tensor on ",
                t->device(), ", arena on ", storage_.device());
  }
  TORCH_CHECK(k.size(1) == v.size(1), "KVArena.append: k has ", k.size(1),
              " tokens, v has ", v.size(1));
  const int64_t n = k.size(1);
  const int64_t start = lengths_[layer];
  if (start + n > capacity_) {
    std::ostringstream msg;
    msg << "KV arena full: layer " << layer << " holds " << start << " of " << capacity_
        << " tokens, cannot append " << n;
    throw ArenaFullError(msg.str());
  }
  at::Tensor layer_kv = storage_.select(0, layer);
  layer_kv.select(0, 0).narrow(1, start, n).copy_(k);
  layer_kv.select(0, 1).narrow(1, start, n).copy_(v);
  lengths_[layer] = start + n;
}

void KVArena::start_decoding() {
  check_not_decoding("start_decoding");
  const auto [shortest, longest] = std::minmax_element(lengths_.begin(), lengths_.end());
  TORCH_CHECK(*shortest == *longest, "KVArena.start_decoding: layers hold ", *shortest, " to ",
              *longest, " tokens; a pass through every layer must end first");
  device_length_.fill_(*longest);
  decoding_ = true;
}

void KVArena::add_token() {
  TORCH_CHECK(decoding_, "KVArena.add_token: call start_decoding() first");
  device_length_.add_(1);
}

void KVArena::check_one_token(const at::Tensor& k, const at::Tensor& v) const {
  for (const at::Tensor* t : {&k, &v}) {
    TORCH_CHECK(t->dim() == 3 && t->size(0) == num_kv_heads_ && t->size(1) == 1 &&
                    t->size(2) == head_dim_,
                "KVArena.write_token: expected [", num_kv_heads_, ", 1, ", head_dim_, "], got ",
                t->sizes());
    TORCH_CHECK(t->device() == storage_.device() && t->scalar_type() == storage_.scalar_type(),
                "KVArena.write_token: k and v must have the arena's device and dtype");
  }
}

void KVArena::write_token(int64_t layer, const at::Tensor& k, const at::Tensor& v) {
  check_layer(layer);
  TORCH_CHECK(decoding_, "KVArena.write_token: call start_decoding() first");
  check_one_token(k, v);
  auto [cache_k, cache_v] = slots(layer);
#ifdef STAR_ENGINE_WITH_CUDA
  if (storage_.is_cuda()) {  // the slot is read on the device: no host round trip
    write_token_cuda(cache_k, cache_v, k, v, device_length_);
    return;
  }
#endif
  TORCH_CHECK(storage_.device().is_cpu(), "KVArena.write_token: this build has no kernel for ",
              storage_.device());
  const int64_t slot = device_length_.item<int32_t>() - 1;
  if (slot < 0 || slot >= capacity_) {
    throw ArenaFullError("KV arena full: no slot " + std::to_string(slot) + " of " +
                         std::to_string(capacity_));
  }
  cache_k.narrow(1, slot, 1).copy_(k);
  cache_v.narrow(1, slot, 1).copy_(v);
}

void KVArena::finish_decoding() {
  TORCH_CHECK(decoding_, "KVArena.finish_decoding: not decoding");
  const int64_t length = device_length_.item<int32_t>();
  decoding_ = false;
  if (length > capacity_) {
    // Decoding wrote past the end: what the plan must prevent. Nothing after it is valid.
    std::fill(lengths_.begin(), lengths_.end(), 0);
    throw ArenaFullError("KV arena overrun: decoding reached " + std::to_string(length) +
                         " tokens, the arena holds " + std::to_string(capacity_));
  }
  std::fill(lengths_.begin(), lengths_.end(), length);
}

void KVArena::truncate(int64_t length) {
  check_not_decoding("truncate");
  for (int64_t len : lengths_) {
    TORCH_CHECK(length >= 0 && length <= len, "KVArena.truncate: a layer holds ", len,
                " tokens, cannot keep ", length);
  }
  std::fill(lengths_.begin(), lengths_.end(), length);
}

void KVArena::clear() {
  std::fill(lengths_.begin(), lengths_.end(), 0);
  decoding_ = false;
}

}  // namespace star
