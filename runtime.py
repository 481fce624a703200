"""Where a script runs: the local device under torchrun, the ranks and what they exchange, the --amp
context and the fast sampling copy of a model (channels-last, torch.compile).

Shared by train.py and extract.py, so that neither the trainer nor the paper's algorithms carry
distributed plumbing. Depends on torch and common.py (UserError).
"""
import copy
import os
import sys
from typing import NamedTuple

import torch
import torch.distributed as dist

from common import atomic_write_text, check


class Ranks(NamedTuple):
    """This process's place under torchrun: rank 0 of 1 when run alone. Unpacks as (rank, world)."""
    rank: int = 0
    world: int = 1

    def agree(self, obj):
        """Rank 0's value of obj, on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj):
        """[every rank's obj] on rank 0, None on the others."""
        if self.world == 1:
            return [obj]
        parts = [None] * self.world if self.rank == 0 else None
        dist.gather_object(obj, parts, dst=0)
        return parts

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def log(self, msg):
        """A progress line on stderr, from rank 0 only."""
        if self.rank == 0:
            print(msg, file=sys.stderr, flush=True)


def shutdown(finished):
    """End torchrun's process group: after a barrier when this rank finished its work (so that no rank
    tears down its transport while another still talks to it: gloo then aborts a rank at exit,
    'terminate called without an active exception'), at once after an error (a barrier could hang)."""
    if dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def local_device(device):
    """Under torchrun on CUDA each process takes the GPU of its LOCAL_RANK; otherwise `device` unchanged."""
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return device


def setup_distributed(device):
    """Ranks under torchrun (NCCL on CUDA, gloo on CPU); Ranks(0, 1) otherwise."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return Ranks()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size())


def check_shared_folder(folder, ranks):
    """Every rank reads every rank's files in `folder`: refuse a folder that not all nodes see."""
    if ranks.world == 1:
        return
    probe = os.path.join(folder, f".shared-{ranks.agree(os.urandom(8).hex())}")  # a fresh name: no stale NFS lookup
    if ranks.rank == 0:
        atomic_write_text(probe, "")
    dist.barrier()
    seen = [None] * ranks.world
    dist.all_gather_object(seen, os.path.exists(probe))
    if ranks.rank == 0:
        os.unlink(probe)
    check(all(seen), f"the cache folder {folder} is not shared by all {ranks.world} processes (a rank "
          "cannot see rank 0's files); under torchrun across nodes --out must be on a shared filesystem")


def autocast(amp, device):
    """The forward-pass context of --amp: bf16 autocast (weights stay fp32), or a no-op for 'off'."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16")


def fast_model(model, channels_last=False, compile="off"):
    """The UNet a sampler calls: a channels-last copy and/or torch.compile ("cudagraphs" = its CUDA-graphs
    mode, "reduce-overhead"); with the defaults, `model` itself."""
    if channels_last:
        model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    if compile != "off":
        model = torch.compile(model, mode="reduce-overhead" if compile == "cudagraphs" else None)
    return model
