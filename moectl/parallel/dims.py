"""The parallel degrees of one run, checked once against the world size and the model, and the named
device meshes they define (in the spirit of torchtitan's ParallelDims).

Mesh axes:

- `dp`: ranks that read different data (the data-parallel degree; data rank r reads slice r);
- `tp`: ranks that split attention heads and expert width over the same tokens;
- `ep`: ranks that split the experts, consecutive ranks (one host's fast links); `ep_replicate`
  runs across EP groups, over the ranks that hold the same experts.

Ranks are laid out dp-major with tp innermost. The world is dp × tp, and ranks that read the same
data must split the model between them; the one exception is a world whose ranks all read the same
data and split only the experts (dp = tp = 1, ep = world: the naive expert-parallel baseline).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from moectl.config import ModelConfig
from moectl.errors import UsageError


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class ParallelDims:
    world_size: int
    dp: int = 1
    tp: int = 1
    ep: int = 1
    _meshes: dict[str, DeviceMesh] = field(default_factory=dict, compare=False, repr=False)

    @property
    def ep_replicate(self) -> int:
        """How many copies of each expert the world holds."""
        return self.world_size // self.ep

    @property
    def splits_experts_only(self) -> bool:
        """Every rank reads the same data and holds its own experts (dp = tp = 1, ep = world > 1)."""
        return self.world_size > 1 and self.dp == self.tp == 1 and self.ep == self.world_size

    def spans_nodes(self, axis: str, ranks_per_node: int) -> bool:
        """Whether a group of `axis` reaches beyond one node of `ranks_per_node` ranks: `tp` and `ep` groups
        are consecutive ranks (within a node while they fit), the others stride over the world."""
        if axis in ("tp", "ep"):
            return getattr(self, axis) > ranks_per_node
        return self.world_size > ranks_per_node

    def check(self, model: ModelConfig, strategy: str) -> None:
        """The rules every strategy shares; each failure names the numbers and the fix."""
        for axis in ("dp", "tp", "ep"):
            if getattr(self, axis) < 1:
                raise UsageError(
                    f"{strategy}: the {axis} degree must be 1 or more, got {getattr(self, axis)}"
                )
        splits_experts_only = self.splits_experts_only
        if self.dp * self.tp != self.world_size and not splits_experts_only:
            raise UsageError(
                f"{strategy}: --dp-size {self.dp} × --tp-size {self.tp} = {self.dp * self.tp} must equal "
                f"the world size {self.world_size}; set --nproc {self.dp * self.tp} or change the degrees"
            )
        if self.world_size % self.ep:
            raise UsageError(
                f"{strategy}: --ep-size {self.ep} must divide the world size {self.world_size}; "
                f"use --nproc {self.ep} (or a multiple of {self.ep})"
            )
        if self.ep > 1 and self.tp > 1:
            raise UsageError(f"{strategy}: expert and tensor parallelism do not compose yet; drop --tp-size")
        if self.ep > 1 and not splits_experts_only and self.dp % self.ep:
            raise UsageError(
                f"{strategy}: --ep-size {self.ep} must divide the data-parallel degree {self.dp} "
                "(EP ranks read their own data)"
            )
        if model.num_experts % self.ep:
            raise UsageError(
                f"{strategy}: --ep-size {self.ep} must divide model.num_experts {model.num_experts}; "
                f"use one of {', '.join(map(str, _divisors(model.num_experts)))}"
            )
        if self.tp > 1:
            self._check_tp_divides(model, strategy)

    def _check_tp_divides(self, model: ModelConfig, strategy: str) -> None:
        sizes = {
            "num_heads": model.num_heads,
            "num_kv_heads": model.num_kv_heads,
            "moe_intermediate_size": model.moe_intermediate_size,
        }
        common = math.gcd(*sizes.values())
        fitting = [str(d) for d in _divisors(common) if d > 1]
        if fitting:
            fix = f"use --tp-size {' or '.join(fitting)} (divides heads, KV heads and expert width)"
        else:
            fix = "heads, KV heads and expert width share no factor above 1; use ddp or fsdp"
        for key, size in sizes.items():
            if size % self.tp:
                raise UsageError(
                    f"{strategy}: --tp-size {self.tp} does not divide model.{key} = {size}; {fix}"
                )

    # ---- meshes --------------------------------------------------------------------------------
    def mesh(self, axis: str) -> DeviceMesh | None:
        """The 1-D mesh of `axis` through this rank (None on one process). Built on first use, after
        the process group exists: the world mesh (dp, tp) for `dp`/`tp`, the expert mesh
        (ep_replicate, ep) for `ep`/`ep_replicate`; `world` and `experts` name the 2-D meshes."""
        if self.world_size == 1:
            return None
        kind = {"dp": "world", "tp": "world", "ep": "experts", "ep_replicate": "experts"}.get(axis, axis)
        if kind not in ("world", "experts"):
            raise KeyError(f"no mesh axis {axis!r}")
        if kind not in self._meshes:
            device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
            if kind == "experts":
                shape, names = (self.ep_replicate, self.ep), ("ep_replicate", "ep")
            elif self.splits_experts_only:  # a dp axis of size 1: summing over it leaves the loss alone
                shape, names = (1, self.world_size), ("dp", "same_data")
            else:
                shape, names = (self.dp, self.tp), ("dp", "tp")
            self._meshes[kind] = init_device_mesh(device_type, shape, mesh_dim_names=names)
        mesh = self._meshes[kind]
        return mesh if axis == kind else mesh[axis]

    def group(self, axis: str) -> dist.ProcessGroup | None:
        mesh = self.mesh(axis)
        return None if mesh is None else mesh.get_group()

    def local_rank(self, axis: str) -> int:
        mesh = self.mesh(axis)
        return 0 if mesh is None else mesh.get_local_rank()

    @property
    def dp_rank(self) -> int:
        """Which data slice this rank reads."""
        return self.local_rank("dp")
