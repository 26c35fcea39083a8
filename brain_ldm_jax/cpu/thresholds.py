"""The CPU dispatch thresholds: which lowering a convolution or matmul takes, by its shape.

One table. Each value is backed by the row of the same name in benchmarks/benchmark.md's
"CPU dispatch thresholds" table (measured with scripts/benchmark_conv.py and
scripts/benchmark_networks.py); change a value only with a new row there.
"""

from __future__ import annotations

THRESHOLDS: dict[str, int] = {
    # Without oneDNN: depth taps folded into channels (depth_fold) up to this many input channels,
    # where depth_sum's 2D convolutions have too little work per GEMM.
    "fold_max_cin": 8,
    # Without oneDNN: all 27 taps folded into channels (im2col) up to this many input channels.
    "im2col_max_cin": 1,
    # Weight-bound convolutions (kernel taps * Cout >= this * input voxels, batch included) read
    # the kernel once as stored (`patches`).
    "patches_min_kernel_per_voxel": 100,
    # ... the same with oneDNN, whose own convolution reorders its kernel in every call (unless
    # `invariant_kernels` prepares it once: then the threshold above).
    "patches_min_kernel_per_voxel_reordered": 40,
    # With oneDNN, 3^3 stride-1 convolutions with at least this many input and output channels
    # and in-plane voxels use winograd; it loses on small planes and few channels.
    "winograd_min_channels": 64,
    "winograd_min_plane": 128,
    # ... and inputs of at most this many elements: its backward pass builds the transformed
    # input (twice the input), which the paper autoencoder cannot take at full resolution.
    "winograd_max_elements": 1 << 24,
    # Winograd along depth and height (not depth alone) from this many in-plane voxels.
    "winograd_dh_min_plane": 192,
    # Without oneDNN, at most this many input voxels use native_im2col.
    "tiny_max_voxels": 128,
    # Matmuls with kernels of at least this many elements use oneDNN's sgemm; XLA fuses what
    # surrounds small ones.
    "onednn_matmul_min_kernel": 1 << 18,
    # oneDNN convolutions with at least this many input and output channels (3D, more than one
    # tap) run on activations in its blocked layout, reordered inside the call.
    "blocked_min_channels": 512,
    # The ×2 upsampling convolution: below this many input voxels (batch included) upsample
    # then convolve; from it, the 8 sub-pixel parity convolutions.
    "subpixel_min_voxels": 256,
    # ... and from this many input and output channels with oneDNN, the per-tap products
    # handler (`onednn.upsample2_conv`).
    "tap_products_min_channels": 256,
    # Kernel-gradient chunks of depth_sum / depth_fold hold about this many input floats (an
    # L2 cache), at least this many rows, and are at most this many (compile time).
    "dw_chunk_floats": 1 << 18,
    "dw_chunk_min_rows": 2048,
    "dw_max_chunks": 8,
}
