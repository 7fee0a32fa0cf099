"""Run a function on several CPU processes joined over gloo, and read back what each rank returned."""
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank(rank: int, world: int, port: int, out_dir: str, work, args: tuple) -> None:
    # Triton kernels here run on CPU tensors: this fresh process switches the interpreter on before triton is
    # first imported (also on a CUDA machine, where gloo and the ranks share no GPU).
    if "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.save(work(rank, *args), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def on_ranks(work, world: int, out_dir: str, *args) -> list:
    """work(rank, *args) on `world` processes of one gloo group (a module-level function, so that spawn can pickle
    it); each rank's return value, in rank order."""
    from conftest import free_port

    mp.spawn(_rank, args=(world, free_port(), out_dir, work, args), nprocs=world, join=True)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world)]
