"""Run under `accelerate launch --multi_gpu --num_processes 2` by tests/training/test_distributed.py.

Checks, with the project's own parts on 2 CPU processes over gloo:
1. shards: in one epoch the two processes read disjoint samples that together cover the data
   (an array source whose labels are the sample index, or the WebDataset shards given as argv[1]);
2. gradients: DDP (as accelerate prepares it) + NT-Xent with negatives gathered across processes
   gives the same loss and parameter gradients as one process holding the whole batch. In float64:
   rounding is then ~1e-16 while every bug this exists for (a missing all-reduce, a wrong average, a
   gather without gradients, batch-dependent BN) moves the loss or a gradient by O(1).
Prints one JSON line from rank 0: the measurements and the sizes their error bounds are computed from.
"""
import json
import sys

import numpy as np
import torch
import torch.distributed as dist

from simclr_dali.models.ntxent import nt_xent_loss
from simclr_dali.pipelines.augment import Augment
from simclr_dali.pipelines.loader import Shard, train_loader
from simclr_dali.pipelines.sources import Source, load_source
from simclr_dali.training import build_model, make_accelerator, parse_args

TAU = 0.2
PAIRS = 8  # the whole batch: 4 pairs per process


def labels_read(source: Source, shard: Shard, batch: int) -> list[int]:
    loader = train_loader(source, batch_size=batch, size=16, aug=Augment(), shard=shard, seed=0, epoch=0,
                          workers=1, device_id=None)
    return torch.cat([y.view(-1) for _, _, y in loader]).tolist()


def sums(model: torch.nn.Module, images: torch.Tensor) -> tuple[int, int]:
    """(K, L): the most terms of any one sum in a forward or backward pass of `model` on `images` (a
    convolution's or linear layer's dot products forward, its transposed ones backward, its weight
    gradients over batch x positions, BatchNorm's parameter gradients over the same), and the number
    of such layers, which bounds how many sums lie on any path through the network (+1: the pool)."""
    sizes, layers = [], [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]

    def record(module, args, out):
        k = module.kernel_size[0] * module.kernel_size[1] // module.groups if out.dim() == 4 else 1
        fan_in, fan_out = (module.in_channels * k, module.out_channels * k) if out.dim() == 4 else \
            (module.in_features, module.out_features)
        sizes.extend([fan_in, fan_out, out.numel() // out.shape[1]])

    handles = [m.register_forward_hook(record) for m in layers]
    with torch.no_grad():
        model(images)
    for h in handles:
        h.remove()
    return max(sizes), len(layers) + 1


def compare_gradients(accelerator, seed: int) -> dict:
    """One process against two, float64: the loss and every parameter's gradient."""
    rank, world = accelerator.process_index, accelerator.num_processes
    cfg = parse_args(["--backbone", "resnet18", "--proj-hidden", "64", "--proj-dim", "32"])
    torch.manual_seed(seed)
    model = build_model(cfg).double().eval()  # eval-mode BN: per-process batch statistics are not the point here
    single = build_model(cfg).double().eval()
    single.load_state_dict(model.state_dict())
    gen = torch.Generator().manual_seed(seed + 1)
    view1, view2 = (torch.randn(PAIRS, 3, 32, 32, generator=gen, dtype=torch.float64) for _ in range(2))
    model = accelerator.prepare(model)
    mine = slice(rank * PAIRS // world, (rank + 1) * PAIRS // world)
    z = model(torch.cat([view1[mine], view2[mine]]))
    loss = nt_xent_loss(*z.chunk(2), TAU, impl="tiled")
    accelerator.backward(loss)
    losses = [None] * world
    dist.all_gather_object(losses, loss.item())
    if rank != 0:
        return {}
    views = torch.cat([view1, view2])
    z = single(views)
    ref = nt_xent_loss(*z.chunk(2), TAU, impl="reference", distributed=False)
    ref.backward()
    grads = [((p.grad - q.grad).abs().max().item(), q.grad.abs().max().item(), p.grad.abs().max().item())
             for p, q in zip(accelerator.unwrap_model(model).parameters(), single.parameters())]
    longest, layers = sums(single, views)
    return {"rank_losses": losses, "single_loss": ref.item(), "grads": grads, "longest_sum": longest, "layers": layers,
            "tau": TAU, "pairs": PAIRS, "dim": z.shape[1], "dtype": str(z.dtype).removeprefix("torch.")}


def main() -> None:
    accelerator = make_accelerator()
    rank, world = accelerator.process_index, accelerator.num_processes
    assert world == 2 and dist.get_backend() == "gloo", (world, dist.get_backend())
    result = {"world": world}

    # 1. disjoint shards that cover the data
    n = 32
    arrays = Source("arrays", np.arange(n, dtype=np.int64),
                    images=np.random.default_rng(0).integers(0, 256, (n, 20, 20, 3), dtype=np.uint8))
    sources = {"arrays": arrays}
    if len(sys.argv) > 1:
        sources["wds"] = load_source(f"wds:{sys.argv[1]}", "train", f"wds:{sys.argv[1]}")  # every shard
    for name, source in sources.items():
        mine = labels_read(source, Shard(rank, world), batch=4)
        everyone = [None] * world
        dist.all_gather_object(everyone, mine)
        result[name] = everyone

    # 2. one process against two: loss and gradients
    result.update(compare_gradients(accelerator, seed=0))

    # 3. rows of unequal parts (one empty), in chunks of 3 rows, float32 where one part needs it, placed by order
    from simclr_dali.models.features import gather_rows
    part = torch.arange(7 * 2, dtype=torch.float32).view(7, 2) if rank == 0 else torch.zeros((0, 2), dtype=torch.float16)
    order = np.arange(7)[::-1].copy()
    got = gather_rows(part, torch.device("cpu"), chunk_bytes=3 * 2 * 4, keep=rank == 0, order=order)
    labels = gather_rows(torch.arange(rank, 5 * rank + 2), torch.device("cpu"), chunk_bytes=16)  # 2 and 6 rows
    result["gathered"] = {"rows": got.tolist() if got is not None else None, "dtype": str(part.dtype),
                          "labels": labels.tolist()}
    if rank == 0:
        print(json.dumps(result))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
