"""Shared helpers for the expert-parallel tests (tests/test_ep_*.py) on CPU over gloo.

Multi-process tests spawn 2 or 4 processes (torch.multiprocessing, gloo); every rank computes
the EP=1 reference itself (tiny sizes) and compares its own shard, so failures name the rank.
Test files import it as `ep_helpers`: tests/ has no __init__.py, so pytest's default "prepend"
import mode puts tests/ itself on sys.path, and spawned processes inherit that path.
"""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moe.config import ModelConfig, MoEConfig


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    os.environ["TRITON_INTERPRET"] = "0"  # FP8 kernels by their pure-torch references on CPU
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
        dist.barrier()  # leave together: gloo aborts a process whose peer tears down first
    finally:
        dist.destroy_process_group()


def _spawn(fn, world, *args):
    mp.start_processes(_entry, args=(world, _free_port(), fn, args), nprocs=world, start_method="spawn")


def _env(world, ep):
    from torch.distributed.device_mesh import init_device_mesh

    from trainer.parallel import DistEnv

    mesh = init_device_mesh("cpu", (world // ep, ep), mesh_dim_names=("dp", "ep"))
    return DistEnv(dist.get_rank(), world, 0, torch.device("cpu"), ep, mesh)


def _close(a, b, what, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"rank {dist.get_rank()} {what}: {m}")

# ---- a tiny model, built the same way on every rank -----------------------------------------------


def _tiny_cfg():
    moe = MoEConfig(num_experts=4, top_k=2, ffn_dim=32, aux_loss_coeff=0.01)
    return ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16, moe=moe)


def _build(cfg):
    from moe.model import build_model

    torch.manual_seed(0)
    return build_model(cfg)
