"""Everything specific to running on CPU: XLA:CPU lowerings, oneDNN kernels, host settings.

Model code never imports this package; it calls `brain_ldm_jax.nn.ops`, the one seam, which
dispatches here. Modules, bottom up:
  ffi          builds, loads and registers the C++ FFI handlers (onednn_conv.cc), at backend choice
  partition    per-device calls of those handlers in batch-sharded programs
  onednn       the handlers' JAX functions: convolutions, matmul, probe, materialize
  thresholds   the dispatch thresholds, one table
  schedule     after / in_memory / invariant_kernels: memory and ordering tools for XLA:CPU
  lowerings    exact XLA rewrites of 3D convolutions, and the dense matmul
  winograd     Winograd F(2,3) over oneDNN's convolutions
  dispatch     which lowering a convolution takes (`choose_impl`), and `conv`
  upsample     the ×2 upsampling convolution
  host         the process's malloc settings for XLA:CPU's large per-call buffers
"""
