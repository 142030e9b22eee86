"""The profiler summary's kernel classes: the names torch.profiler reports on an H200, each in its class."""

from __future__ import annotations

import pytest

from nanodit.tracing import kernel_class


@pytest.mark.parametrize(
    "name, cls",
    [
        ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x64", "attention"),
        ("nvjet_sm90_tst_192x128_64x5_1x2_h_bz_coopB_NNT", "gemm"),
        ("void gemv2T_kernel_val<int, int, __nv_bfloat16, __nv_bfloat16, float, 128, 16, 4, 4>", "gemm"),
        ("_residual_modulate_bwd_kernel", "nanodit triton"),
        (
            "void at::native::(anonymous namespace)::GammaBetaBackwardCUDAKernelTemplate<float, float>",
            "layer norm",
        ),
        (
            "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<float, float, false>",
            "layer norm",
        ),
        (
            "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::FusedAdam>",
            "optimizer / ema",
        ),
        ("void at::native::reduce_kernel<128, 4, at::native::ReduceOp<c10::BFloat16>>", "reduction"),
        (
            "void at::native::vectorized_elementwise_kernel<8, at::native::bfloat16_copy_kernel_cuda>",
            "copy / fill",
        ),
        ("void at::native::vectorized_elementwise_kernel<8, at::native::GeluCUDAKernelImpl>", "elementwise"),
        ("something_new", "other"),
    ],
)
def test_kernel_class(name, cls):
    assert kernel_class(name) == cls
