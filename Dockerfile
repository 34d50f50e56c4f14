# Training image: NGC PyTorch (CUDA, cuDNN, NCCL, torch, Triton and Transformer Engine, built and
# tested together for Hopper) plus this project's other dependencies. The code runs from
# /workspace/fp8moe, as it does from a checkout; nothing of it is installed into site-packages.
#
#   docker build -t fp8moe .
#   docker run --gpus all --ipc=host fp8moe torchrun --standalone --nproc_per_node 8 train.py <overrides>
#   Slurm + pyxis: CONTAINER_IMAGE=<registry>#fp8moe sbatch launch/slurm.sbatch <overrides>
FROM nvcr.io/nvidia/pytorch:26.02-py3

# What the base image ships (NGC PyTorch 26.02 release notes): Python 3.12 and NVIDIA's torch build
# of the 2.11 release branch. tests/test_packaging.py reads pyproject.toml's dependencies for this
# Python and holds this torch to the supported range; the last step checks the image itself.
ARG BASE_PYTHON=3.12
ARG BASE_TORCH=2.11.0a0+eb65b36914.nv26.02

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /workspace/fp8moe

# pyproject.toml's dependencies for Python 3.12, in their own layer so a code change does not
# reinstall them; tests/test_packaging.py fails when a version here and there disagree. torch and
# triton are the base image's and stay: NGC's pip constraint file (/etc/pip/constraint.txt) pins
# everything it ships. safetensors, numpy, tqdm and matplotlib take a range: the image may ship
# them, pinned by that file.
RUN pip install --no-cache-dir \
        hydra-core==1.3.2 \
        omegaconf==2.3.0 \
        megatron-core==0.19.2 \
        tokenizers==0.23.3 \
        "safetensors>=0.4" \
        wandb==0.31.0 \
        "numpy>=1.26" \
        "tqdm>=4.66" \
        "matplotlib>=3.8"

COPY . .

# The build stops unless the image runs the declared Python and torch and every dependency is one
# pyproject.toml allows. outputs/ is world-writable because Hydra writes run directories there and
# clusters run the image under the user's own uid, not root.
RUN python3 tools/check_env.py --python "$BASE_PYTHON" --torch "$BASE_TORCH" \
    && mkdir -p outputs \
    && chmod 1777 outputs

CMD ["python", "train.py", "--help"]
