PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
#if defined(MTPLX_AVX512BF16)
  m.def("rowmm_bf16", &rowmm_bf16, "bf16 x bf16 few-row matmul by AVX512-BF16 dot products");
#endif
  m.def("attend_rows", &attend_rows, "few-row attention over a KV cache, fixed order per row");
  m.def("rowmm", &rowmm, "fixed-order few-row matmul");
  m.def("argmax_rows", &argmax_rows, "per row the first index of the maximum (or of the first NaN)");
  m.def("gdn_core", &gdn_core, "fused GatedDeltaNet step between its projections");
  m.def("rms_rows", &rms_rows, "RMS norm of rows, fp32 math, fixed order");
  m.def("moe_act", &moe_act, "dense MoE routing and activations between the two matmuls");
  py::class_<Step>(m, "Step", "a decoder stack's whole exact step in one call (step.cpp)")
      .def(py::init<int64_t, double, torch::Tensor, torch::Tensor, int64_t>())
      .def("set_fc", &Step::set_fc)
      .def("add_attention", &Step::add_attention)
      .def("add_gdn", &Step::add_gdn)
      .def("set_dense_mlp", &Step::set_dense_mlp)
      .def("set_moe", &Step::set_moe)
      .def("run", &Step::run, py::call_guard<py::gil_scoped_release>())
      .def("draft_chain", &Step::draft_chain, py::call_guard<py::gil_scoped_release>());
}
