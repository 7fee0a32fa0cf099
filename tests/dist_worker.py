"""Run under `accelerate launch --multi_gpu --num_processes 2` by tests/test_distributed.py.

Checks, with the project's own parts on 2 CPU processes over gloo:
1. shards: in one epoch the two processes read disjoint samples that together cover the data
   (an array source whose labels are the sample index, or the WebDataset shards given as argv[1]);
2. gradients: DDP (as accelerate prepares it) + NT-Xent with negatives gathered across processes
   gives the same loss and parameter gradients as one process holding the whole batch.
Prints one JSON line from rank 0.
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.ntxent import nt_xent_loss  # noqa: E402
from pipelines.augment import Augment  # noqa: E402
from pipelines.loader import Shard, train_loader  # noqa: E402
from pipelines.sources import Source, load_source  # noqa: E402
from train import build_model, make_accelerator, parse_args  # noqa: E402


def labels_read(source: Source, shard: Shard, batch: int) -> list[int]:
    loader = train_loader(source, batch_size=batch, size=16, aug=Augment(), shard=shard, seed=0, epoch=0,
                          workers=1, device_id=None)
    return torch.cat([y.view(-1) for _, _, y in loader]).tolist()


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
    cfg = parse_args(["--backbone", "resnet18", "--proj-hidden", "64", "--proj-dim", "32"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()  # eval-mode BN: per-process batch statistics are not the point here
    single = build_model(cfg).eval()
    single.load_state_dict(model.state_dict())
    gen = torch.Generator().manual_seed(1)
    view1, view2 = torch.randn(8, 3, 32, 32, generator=gen), torch.randn(8, 3, 32, 32, generator=gen)
    model = accelerator.prepare(model)
    mine = slice(rank * 4, rank * 4 + 4)
    z = model(torch.cat([view1[mine], view2[mine]]))
    loss = nt_xent_loss(*z.chunk(2), 0.2, impl="tiled")
    accelerator.backward(loss)
    losses = [None] * world
    dist.all_gather_object(losses, loss.item())
    if rank == 0:
        z = single(torch.cat([view1, view2]))
        ref = nt_xent_loss(*z.chunk(2), 0.2, impl="reference", distributed=False)
        ref.backward()
        worst = 0.0
        for (name, p), q in zip(accelerator.unwrap_model(model).named_parameters(), single.parameters()):
            err = ((p.grad - q.grad).abs().max() / q.grad.abs().max().clamp_min(1e-12)).item()
            worst = max(worst, err)
        result.update(rank_losses=losses, single_loss=ref.item(), worst_grad_rel_err=worst)
        print(json.dumps(result))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
