"""Where a script runs: the local device under torchrun, the process group, and the --amp context.

Shared by train.py and extract.py (so extract.py need not import the trainer). Depends on torch only.
"""
import os

import torch
import torch.distributed as dist


def local_device(device):
    """Under torchrun on CUDA each process takes the GPU of its LOCAL_RANK; otherwise `device` unchanged."""
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return device


def setup_distributed(device):
    """(rank, world) under torchrun (NCCL on CUDA, gloo on CPU); (0, 1) otherwise."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def autocast(amp, device):
    """The forward-pass context of --amp: bf16 autocast (weights stay fp32), or a no-op for 'off'."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16")
