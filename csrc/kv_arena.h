// KV arena: the key/value cache of one rank in one allocation.
//
// Sized up front from the plan (layers x {K,V} x kv_heads x capacity x head_dim),
// so that a request that does not fit is refused before any compute, and an
// append can never overwrite another layer's keys or grow memory mid-request.
#pragma once

#include <ATen/ATen.h>

#include <stdexcept>
#include <string>
#include <vector>

namespace star {

// Raised when a request needs more KV slots than the arena holds.
class ArenaFullError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class KVArena {
 public:
  KVArena(int64_t num_layers, int64_t num_kv_heads, int64_t head_dim, int64_t capacity,
          at::ScalarType dtype, at::Device device);

  // Keys / values of one layer written so far: a view [kv_heads, length, head_dim].
  at::Tensor keys(int64_t layer) const;
  at::Tensor values(int64_t layer) const;

  // Copies k, v ([kv_heads, n, head_dim]) behind the layer's current length.
  void append(int64_t layer, const at::Tensor& k, const at::Tensor& v);

  // Counts `tokens` more slots as written in every layer: for writes made by a kernel that
  // reads the length from device memory (a captured decode step). Bounds-checked.
  void advance(int64_t tokens);

  // Throws ArenaFullError unless every layer can take `tokens` more slots.
  void check_fits(int64_t tokens) const;

  // Forgets all keys (the memory stays allocated).
  void clear();

  int64_t num_layers() const { return num_layers_; }
  int64_t capacity() const { return capacity_; }
  int64_t length(int64_t layer) const;
  int64_t nbytes() const { return storage_.nbytes(); }
  const at::Tensor& storage() const { return storage_; }

 private:
  void check_layer(int64_t layer) const;
  at::Tensor view(int64_t layer, int64_t kv) const;

  int64_t num_layers_, num_kv_heads_, head_dim_, capacity_;
  at::Tensor storage_;  // [layers, 2, kv_heads, capacity, head_dim]
  std::vector<int64_t> lengths_;
};

}  // namespace star
