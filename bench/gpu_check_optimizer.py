"""One GPU: tp's optimizer fix under CUDA defaults (foreach / fused picked by torch, nothing forced).

A 1-process NCCL group, a DTensor parameter beside plain ones: one SGD param group with both kinds
fails as tp did on 2 H200s; moectl's build_optimizer (one group per kind) steps.
Run: python3 bench/gpu_check_optimizer.py
"""

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from moectl.config import TrainConfig
from moectl.loop import build_optimizer


def model_with_mixed_parameters(mesh) -> nn.Module:
    model = nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64)).cuda().bfloat16()
    model[0].weight = nn.Parameter(distribute_tensor(model[0].weight.detach(), mesh, [Shard(0)]))
    for param in model.parameters():
        param.grad = torch.ones_like(param)
    return model


def main() -> None:
    torch.cuda.set_device(0)
    dist.init_process_group(
        "nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=torch.device("cuda", 0)
    )
    mesh = init_device_mesh("cuda", (1,))
    train = TrainConfig(lr=0.1, momentum=0.9, weight_decay=0.01)
    model = model_with_mixed_parameters(mesh)
    try:
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01).step()
        print("one mixed group: stepped (no foreach error on this torch)")
    except RuntimeError as exc:
        print(f"one mixed group: fails as tp did: {str(exc).splitlines()[0][:120]}")
    model = model_with_mixed_parameters(mesh)
    optimizer = build_optimizer(model, train)
    optimizer.step()
    optimizer.step()
    print(
        "build_optimizer groups:",
        [(len(g["params"]), g["fused"], g["foreach"]) for g in optimizer.param_groups],
    )
    print(
        "build_optimizer: stepped twice, finite:",
        all(
            torch.isfinite(p.full_tensor() if hasattr(p, "full_tensor") else p).all().item()
            for p in model.parameters()
        ),
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
