# Sourced by the device-call scripts (gpu_session.sh, lanes_session.sh, scaling_session.sh,
# ep_session.sh): the environment every one of them needs on a lent GPU machine.
#   PIP_LOG=<file> source bench/device_env.sh      (pip's output goes there; default /dev/null)
# - NVLink multicast off (NCCL NVLS, symmetric-memory multicast, NVSHMEM NVLS): KINDS.md of the
#   device tool says the lent machines do not support it.
# - The lent machine reaches no registry: hydra-core, omegaconf, megatron-core, torchao travel as
#   wheels in .whl/ (../shared/tools/gpu-wheels.sh) and go into /tmp/site; a failed install warns.
# - The repository on PYTHONPATH, unbuffered output, the trainer's cache under /tmp.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl > "${PIP_LOG:-/dev/null}" 2>&1; then
        export PYTHONPATH=/tmp/site
    else
        echo "warning: pip could not install .whl/*.whl${PIP_LOG:+ ($PIP_LOG)}"
    fi
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" FP8MOE_CACHE=${FP8MOE_CACHE:-/tmp/fp8moe_cache}
