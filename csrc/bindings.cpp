// Python bindings of star_engine._C: thin glue between torch tensors and the core.
#include <torch/extension.h>

#include "kv_arena.h"
#include "lse_merge.h"
#ifdef STAR_ENGINE_WITH_CUDA
#include "cuda_glue.h"
#endif

namespace {

// o_parts [W, rows, dim] and lse_parts [W, rows]: each part contiguous inside,
// parts at any stride (views into one packed exchange buffer are accepted).
std::tuple<at::Tensor, at::Tensor> lse_merge(const at::Tensor& o_parts,
                                             const at::Tensor& lse_parts) {
  TORCH_CHECK(o_parts.dim() == 3, "lse_merge: o_parts must be [W, rows, dim], got ",
              o_parts.sizes());
  TORCH_CHECK(lse_parts.dim() == 2 && lse_parts.size(0) == o_parts.size(0) &&
                  lse_parts.size(1) == o_parts.size(1),
              "lse_merge: lse_parts must be [W, rows] = [", o_parts.size(0), ", ",
              o_parts.size(1), "], got ", lse_parts.sizes());
  TORCH_CHECK(lse_parts.scalar_type() == at::kFloat, "lse_merge: lse must be float32");
  TORCH_CHECK(o_parts.stride(2) == 1 && o_parts.stride(1) == o_parts.size(2),
              "lse_merge: each part of o must be contiguous");
  TORCH_CHECK(lse_parts.stride(1) == 1, "lse_merge: each part of lse must be contiguous");
  TORCH_CHECK(o_parts.device() == lse_parts.device(), "lse_merge: o and lse on different devices");
  const int64_t parts = o_parts.size(0), rows = o_parts.size(1), dim = o_parts.size(2);
  at::Tensor o = at::empty({rows, dim}, o_parts.options());
  at::Tensor lse = at::empty({rows}, lse_parts.options());
#ifdef STAR_ENGINE_WITH_CUDA
  if (o_parts.is_cuda()) {
    star::lse_merge_gpu(o_parts, lse_parts, o, lse);
    return {o, lse};
  }
#endif
  TORCH_CHECK(o_parts.device().is_cpu(), "lse_merge: this build has no kernel for ",
              o_parts.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, o_parts.scalar_type(), "lse_merge",
                                  [&] {
                                    if constexpr (std::is_same_v<scalar_t, double>) {
                                      TORCH_CHECK(false, "lse_merge: float64 is not supported");
                                    } else {
                                      star::lse_merge_cpu<scalar_t>(
                                          o_parts.data_ptr<scalar_t>(), o_parts.stride(0),
                                          lse_parts.data_ptr<float>(), lse_parts.stride(0),
                                          parts, rows, dim, o.data_ptr<scalar_t>(),
                                          lse.data_ptr<float>());
                                    }
                                  });
  return {o, lse};
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "star_engine core: KV arena and log-sum-exp merge";

  pybind11::register_exception<star::ArenaFullError>(m, "ArenaFullError", PyExc_RuntimeError);

  m.def("lse_merge", &lse_merge, pybind11::arg("o_parts"), pybind11::arg("lse_parts"),
        "Merge W partial (o [W, rows, dim], lse [W, rows]) into (o [rows, dim], lse [rows]).");

#ifdef STAR_ENGINE_WITH_CUDA
  star::register_cuda_bindings(m);
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif

  pybind11::class_<star::KVArena>(m, "KVArena")
      .def(pybind11::init([](int64_t layers, int64_t kv_heads, int64_t head_dim,
                             int64_t capacity, at::ScalarType dtype, const at::Device& device) {
             return std::make_unique<star::KVArena>(layers, kv_heads, head_dim, capacity, dtype,
                                                    device);
           }),
           pybind11::arg("num_layers"), pybind11::arg("num_kv_heads"), pybind11::arg("head_dim"),
           pybind11::arg("capacity"), pybind11::arg("dtype"), pybind11::arg("device"))
      .def("keys", &star::KVArena::keys, pybind11::arg("layer"))
      .def("values", &star::KVArena::values, pybind11::arg("layer"))
      .def("append", &star::KVArena::append, pybind11::arg("layer"), pybind11::arg("k"),
           pybind11::arg("v"))
      .def("start_decoding", &star::KVArena::start_decoding)
      .def("add_token", &star::KVArena::add_token)
      .def("write_token", &star::KVArena::write_token, pybind11::arg("layer"), pybind11::arg("k"),
           pybind11::arg("v"))
      .def("finish_decoding", &star::KVArena::finish_decoding)
      .def("slots", &star::KVArena::slots, pybind11::arg("layer"))
      .def("clear", &star::KVArena::clear)
      .def("truncate", &star::KVArena::truncate, pybind11::arg("length"))
      .def("length", &star::KVArena::length, pybind11::arg("layer"))
      .def_property_readonly("num_layers", &star::KVArena::num_layers)
      .def_property_readonly("capacity", &star::KVArena::capacity)
      .def_property_readonly("nbytes", &star::KVArena::nbytes)
      .def_property_readonly("decoding", &star::KVArena::decoding)
      .def_property_readonly("device_length", &star::KVArena::device_length);
}
