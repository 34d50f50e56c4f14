"""bench/kernel_families.py and bench/step_profile.py on CPU: kernel names to families, a trace's
GPU time by family with the idle time, the profiled window, and the refusal without a GPU."""

import gzip
import json
import re

import pytest
import torch

from bench import kernel_families as kf
from bench import step_profile, train_step
from bench.common import REPO

CUTLASS = ("void cutlass::device_kernel<at::cuda::detail::enable_3x_kernel_for_sm9x<cutlass::gemm::kernel::"
           "GemmUniversal<cutlass::gemm::GroupProblemShape<cute::tuple<long, long, long> >, "
           "cutlass::gemm::collective::CollectiveMma<cutlass::gemm::MainloopSm90ArrayTmaGmmaWarpSpecialized<4>, ")
ELEMENTWISE = "void at::native::vectorized_elementwise_kernel<4, at::native::"
ANON = "void at::native::(anonymous namespace)::"
NAMES = {  # kernel names as torch.profiler shows them on Hopper (templates shortened) -> family
    CUTLASS + "cutlass::bfloat16_t, cutlass::bfloat16_t> > >": "gemm_bf16",
    CUTLASS + "cutlass::float_e4m3_t, cutlass::float_e4m3_t> > >": "gemm_fp8",
    "nvjet_tst_128x256_64x4_2x1_v_bz_coopA_TNT": "gemm_bf16",
    "nvjet_qqtst_128x128_128x6_1x2_h_bz_coopA_TNT": "gemm_fp8",
    "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1_execute_segment_k_off_"
    "kernel__5x_cublas": "gemm_bf16",
    "sm90_xmma_gemm_e4m3bf16_e4m3f32_f32_tn_n_tilesize128x128x128_warpgroupsize1x1x1_execute_segment_k_off_"
    "kernel__5x_cublas": "gemm_fp8",
    "void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16, float, __nv_bfloat16, true>": "gemm_bf16",
    "_fp8_grouped_mm_kernel": "gemm_fp8",
    "_fp8_grouped_mm_wgrad_kernel": "gemm_fp8",
    "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, false, false, "
    "cutlass::bfloat16_t>, false, true, false, false, true, true, false, false>": "attention",
    "void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits<128, 64>>": "attention",
    "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x128_4x1x1_kspt0": "attention",
    "fmha_cutlassB_bf16_aligned_64x64_k128_sm80(PyTorchMemEffAttention::AttentionBackwardKernel)": "attention",
    "_act_fwd_kernel": "quantize_activation",
    "_weight_quant_kernel": "quantize_activation",
    ELEMENTWISE + "(anonymous namespace)::silu_kernel(at::TensorIteratorBase&)::{lambda()#1}::operator()() "
    "const::{lambda(c10::BFloat16)#1}, std::array<char*, 2ul> >": "quantize_activation",
    ELEMENTWISE + "CUDAFunctor_add<float>, std::array<char*, 3ul> >": "norm_elementwise",
    "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::MeanOps<float, float, "
    "float, float>, unsigned int, float, 4, 4> >": "norm_elementwise",
    ANON + "CatArrayBatchedCopy<at::native::(anonymous namespace)::OpaqueType<2u>, unsigned int, 4, 64, 64>":
        "norm_elementwise",
    "triton_poi_fused__to_copy_add_mul_0": "norm_elementwise",
    ANON + "cunn_SoftMaxForwardSmem<4, float, float, float, at::native::(anonymous namespace)::"
    "LogSoftMaxForwardEpilogue>": "loss",
    ANON + "nll_loss_forward_reduce_cuda_kernel_2d<float, float, long>": "loss",
    ANON + "softmax_warp_forward<float, float, float, 3, false, false>": "permute_combine",
    "void at::native::sbtopk::gatherTopK<float, unsigned int, 2, false>": "permute_combine",
    "void at_cuda_detail::cub::DeviceRadixSortOnesweepKernel<at_cuda_detail::cub::DeviceRadixSortPolicy<long, "
    "long, int>>": "permute_combine",
    ANON + "indexSelectLargeIndex<c10::BFloat16, long, unsigned int, 2, 2, -2, true>": "permute_combine",
    "void at::native::_scatter_gather_elementwise_kernel<128, 4, at::native::_cuda_scatter_gather_internal_"
    "kernel<true, long>::operator()>": "permute_combine",
    "_combine_fwd_kernel": "permute_combine",
    ANON + "multi_tensor_apply_kernel<at::native::(anonymous namespace)::TensorListMetadata<5>, "
    "at::native::(anonymous namespace)::FusedAdamMathFunctor<float, 5, (at::native::ADAM_MODE)1, false>>": "optimizer",
    "void at::native::multi_tensor_apply_kernel<at::native::TensorListMetadata<1>, at::native::(anonymous "
    "namespace)::LpNormFunctor<float, (at::native::NormType)1, float, float>, float*, int>": "optimizer",
    "void at::native::lpnorm_cleanup<float, (at::native::NormType)1, float, float>": "optimizer",
    "Memcpy DtoD (Device -> Device)": "other",
    "Memset (Device)": "other",
    "ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)": "other",
}  # fmt: skip


@pytest.mark.parametrize("name", list(NAMES))
def test_classify_real_names(name):
    assert kf.classify(name) == NAMES[name]


def test_every_triton_kernel_of_ours_has_a_family():
    launched = set()
    for path in (REPO / "kernels").glob("*.py"):
        launched |= set(re.findall(r"@triton\.jit[^\n]*\n(?:@[^\n]*\n)*def (\w+_kernel)\(", path.read_text()))
    assert len(launched) >= 15, launched
    assert launched <= set(kf.OWN_KERNELS), sorted(launched - set(kf.OWN_KERNELS))
    assert set(kf.OWN_KERNELS.values()) <= set(kf.FAMILIES)


def _trace(tmp_path):
    ev = [  # microseconds; GPU busy 0-40 and 50-60 (the gemm and the add overlap), idle 40 of 100
        {"ph": "X", "cat": "kernel", "name": "nvjet_tst_128x256_64x4_2x1_v_bz_coopA_TNT", "ts": 0.0, "dur": 30.0},
        {"ph": "X", "cat": "kernel", "name": ELEMENTWISE + "CUDAFunctor_add<float>>", "ts": 20.0, "dur": 20.0},
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD (Pageable -> Device)", "ts": 50.0, "dur": 5.0},
        {"ph": "X", "cat": "kernel", "name": "_act_fwd_kernel", "ts": 52.0, "dur": 8.0},
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": -10.0, "dur": 5.0},  # CPU: not GPU time
        {"ph": "X", "cat": "kernel", "name": "nvjet_tst_128x256_64x4_2x1_v_bz_coopA_TNT", "ts": 90.0, "dur": 0.0},
    ]  # fmt: skip
    path = tmp_path / "t.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": ev}, f)
    return path


def test_summarize_families_idle_and_top_kernels(tmp_path):
    trace = kf.load_trace(_trace(tmp_path))
    events = kf.gpu_events(trace)
    assert len(events) == 5 and kf.busy_us(events) == 50.0
    assert kf.trace_span_us(trace) == 100.0  # -10 .. 90
    s = kf.summarize(events, wall_us=100.0, steps=2)
    assert s["wall_ms"] == pytest.approx(0.05) and s["busy_ms"] == pytest.approx(0.025)
    assert s["ms_gemm_bf16"] == pytest.approx(0.015) and s["ms_norm_elementwise"] == pytest.approx(0.010)
    assert s["ms_quantize_activation"] == pytest.approx(0.004) and s["ms_other"] == pytest.approx(0.0025)
    assert s["ms_idle"] == pytest.approx(0.025) and s["share_idle"] == pytest.approx(0.5)
    assert s["share_gemm_bf16"] == pytest.approx(0.3) and s["kernels_per_step"] == 2.5
    top = s["top_kernels"]
    assert top["gemm_bf16"] == [["nvjet_tst_128x256_64x4_2x1_v_bz_coopA_TNT", pytest.approx(0.015)]]
    assert top["other"][0][0] == "Memcpy HtoD (Pageable -> Device)" and top["loss"] == []
    with pytest.raises(ValueError, match="steps must be >= 1"):
        kf.summarize(events, wall_us=100.0, steps=0)


def test_cli_prints_families(tmp_path, capsys):
    kf.main([str(_trace(tmp_path))])
    out = capsys.readouterr().out
    assert "0.10 ms a step (the trace's span), GPU busy 0.05 ms, 5 kernels" in out
    assert re.search(r"gemm_bf16\s+0\.030 ms\s+30\.0%", out) and re.search(r"idle\s+0\.050 ms\s+50\.0%", out)


class _FakeTrainer:
    def __init__(self):
        self.calls = 0

    def train_step(self, it):
        self.calls += 1
        with torch.profiler.record_function(f"fake_step_{self.calls}"):
            torch.ones(8, 8) @ torch.ones(8, 8)


def test_profile_steps_records_only_the_steps_after_the_discarded_one(tmp_path):
    trainer, path = _FakeTrainer(), tmp_path / "p.json.gz"
    wall_us = step_profile.profile_steps(trainer, None, 2, str(path), cuda=False)
    names = {e.get("name") for e in kf.load_trace(path)["traceEvents"]}
    assert trainer.calls == 3 and wall_us > 0
    assert {"fake_step_2", "fake_step_3"} <= names and "fake_step_1" not in names


def test_refuses_without_gpu_before_writing(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "step_profile.json"
    with pytest.raises(SystemExit, match="bench.step_profile needs a CUDA GPU .*nothing was run or written"):
        step_profile.main(["--out", str(out), "--scratch", str(tmp_path / "s")])
    assert not out.exists() and not (tmp_path / "s").exists()
    with pytest.raises(SystemExit):
        step_profile.main(["--impls", "fp16"])
    assert set(step_profile.DEFAULT_MODELS) <= set(train_step.MODELS)
