# Training image: NGC PyTorch (CUDA, cuDNN, NCCL, torch, Triton and Transformer Engine, built and
# tested together for Hopper) plus this project.
#
#   docker build -t fp8moe .
#   docker run --gpus all --ipc=host fp8moe torchrun --standalone --nproc_per_node 8 train.py <overrides>
#   Slurm + pyxis: CONTAINER_IMAGE=<registry>#fp8moe sbatch launch/slurm.sbatch <overrides>
FROM nvcr.io/nvidia/pytorch:25.12-py3

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /workspace/fp8moe

# Third-party dependencies first, in their own layer, so a code change does not reinstall them.
# torch and triton are the base image's and stay: NGC's pip constraint file (/etc/pip/constraint.txt)
# pins everything it ships, and the project below goes in with --no-deps, so its torch requirement
# cannot pull a PyPI wheel over the NGC build.
RUN pip install --no-cache-dir \
        hydra-core==1.3.2 \
        omegaconf==2.3.0 \
        megatron-core==0.16.1 \
        tokenizers==0.23.3 \
        wandb==0.31.0

COPY . .

# --no-build-isolation: build with the image's setuptools instead of fetching one under the
# constraint file. outputs/ is world-writable because Hydra writes run directories there and
# clusters run the image under the user's own uid, not root.
RUN pip install --no-cache-dir --no-deps --no-build-isolation . \
    && mkdir -p outputs \
    && chmod 1777 outputs

CMD ["python", "train.py", "--help"]
