#include "kv_arena.h"

#include <c10/util/Exception.h>

#include <sstream>

namespace star {

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
  storage_ = at::empty({num_layers, 2, num_kv_heads, capacity, head_dim},
                       at::TensorOptions().dtype(dtype).device(device));
}

void KVArena::check_layer(int64_t layer) const {
  if (layer < 0 || layer >= num_layers_) {
    throw std::out_of_range("KVArena: layer " + std::to_string(layer) + " out of range [0, " +
                            std::to_string(num_layers_) + ")");
  }
}

at::Tensor KVArena::view(int64_t layer, int64_t kv) const {
  check_layer(layer);
  return storage_.select(0, layer).select(0, kv).narrow(1, 0, lengths_[layer]);
}

at::Tensor KVArena::keys(int64_t layer) const { return view(layer, 0); }
at::Tensor KVArena::values(int64_t layer) const { return view(layer, 1); }

int64_t KVArena::length(int64_t layer) const {
  check_layer(layer);
  return lengths_[layer];
}

void KVArena::check_fits(int64_t tokens) const {
  int64_t longest = 0;
  for (int64_t len : lengths_) longest = std::max(longest, len);
  if (tokens < 0 || longest + tokens > capacity_) {
    std::ostringstream msg;
    msg << "KV arena full: " << tokens << " more tokens needed, " << (capacity_ - longest)
        << " of " << capacity_ << " slots free";
    throw ArenaFullError(msg.str());
  }
}

void KVArena::append(int64_t layer, const at::Tensor& k, const at::Tensor& v) {
  check_layer(layer);
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

void KVArena::advance(int64_t tokens) {
  check_fits(tokens);
  for (int64_t& len : lengths_) len += tokens;
}

void KVArena::clear() { std::fill(lengths_.begin(), lengths_.end(), 0); }

}  // namespace star
