// KV arena: the key/value cache of one rank in one allocation, and the one owner of how
// much of it is written.
//
// Sized up front from the plan (layers x {K,V} x kv_heads x capacity x head_dim), so that
// a request that does not fit is refused before any compute, and an append can never
// overwrite another layer's keys or grow memory mid-request.
//
// The length lives in one of two places. While a context or a query is encoded, on the
// host, per layer (a layer's keys are appended before the next layer's exist). While
// tokens are decoded one at a time, on the device: a decode step captured in a CUDA graph
// reads and advances it there, so that its replays write where the cache has grown to.
// start_decoding() and finish_decoding() hand it from one to the other.
#pragma once

#include <ATen/ATen.h>

#include <stdexcept>
#include <string>
#include <tuple>
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

  // Decoding. start_decoding: the length (the same in every layer) moves to the device.
  // add_token: one more slot counted there (a device operation, so it can be captured);
  // write_token: one token's k, v ([kv_heads, 1, head_dim]) into the layer's last counted
  // slot, read on the device. finish_decoding: the length comes back to the host, checked
  // against the capacity. Between the two, only the decoding calls are allowed.
  void start_decoding();
  void add_token();
  void write_token(int64_t layer, const at::Tensor& k, const at::Tensor& v);
  void finish_decoding();

  // The length as the device sees it while decoding: int32 [1] on the arena's device.
  const at::Tensor& device_length() const { return device_length_; }
  // Every slot of a layer, written or not ([kv_heads, capacity, head_dim] each), for
  // kernels that read the length from device_length().
  std::tuple<at::Tensor, at::Tensor> slots(int64_t layer) const;

  // Forgets all keys (the memory stays allocated).
  void clear();

  // Forgets every layer's keys after the first `length`: back to an encoded context, so
  // that it answers another question. Throws if a layer holds fewer.
  void truncate(int64_t length);

  int64_t num_layers() const { return num_layers_; }
  int64_t capacity() const { return capacity_; }
  int64_t length(int64_t layer) const;
  int64_t nbytes() const { return storage_.nbytes(); }
  bool decoding() const { return decoding_; }

 private:
  void check_layer(int64_t layer) const;
  void check_not_decoding(const char* what) const;
  void check_one_token(const at::Tensor& k, const at::Tensor& v) const;
  at::Tensor view(int64_t layer, int64_t kv) const;

  int64_t num_layers_, num_kv_heads_, head_dim_, capacity_;
  at::Tensor storage_;  // [layers, 2, kv_heads, capacity, head_dim]
  std::vector<int64_t> lengths_;
  at::Tensor device_length_;
  bool decoding_ = false;
};

}  // namespace star
