"""Tensor layouts for torch.distributed.checkpoint that a DTensor cannot state.

DCP saves and loads any tensor that lists its boxes of the canonical global tensor. A strategy whose
local shard is several pieces of the HF tensor (tp's [gate_r; up_r] rows of gate_up_proj) hands DCP a
`LocalBoxes` view of them (`permuted_blocks_view`), so checkpoints stay in HF order and reshard under
any layout.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType
from torch.distributed.tensor import DTensor, Replicate, Shard


class LocalBoxes(torch.Tensor):
    """A canonical global tensor of which this rank holds several boxes, each a view of local storage.

    Why: a DTensor states one box per rank, but a strategy may keep a layout whose local data is
    several disjoint pieces of the canonical tensor (tp's [gate_r; up_r] rows of gate_up_proj). DCP
    saves and loads any tensor that lists its boxes through the protocol DTensor itself implements
    (`__create_write_items__`, `__create_chunk_list__`, `__get_tensor_shard__`), so the pieces go in
    under their canonical offsets as they are: saving copies one box at a time at most (DCP clones a
    view before writing it), nothing is gathered, and loading writes straight into the original
    tensor (so `load_checkpoint` has nothing to copy back). A tensor subclass because DCP passes only
    tensors through its state-dict handling; it holds no data of its own and supports no operation.
    """

    boxes: dict[torch.Size, torch.Tensor]

    @staticmethod
    def __new__(cls, like: torch.Tensor, boxes: Sequence[tuple[Sequence[int], torch.Tensor]]) -> LocalBoxes:
        self = torch.Tensor._make_wrapper_subclass(cls, like.shape, dtype=like.dtype, device=like.device)
        self.boxes = {torch.Size(offsets): view for offsets, view in boxes if view.numel()}
        return self

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise NotImplementedError(f"LocalBoxes only goes into torch.distributed.checkpoint, not into {func}")

    def __repr__(self) -> str:
        return f"LocalBoxes({tuple(self.shape)}, offsets={[tuple(offsets) for offsets in self.boxes]})"

    def __create_write_items__(self, fqn: str, obj: object) -> list[WriteItem]:
        return [
            WriteItem(
                index=MetadataIndex(fqn, offsets),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=offsets, sizes=view.shape),
                    properties=TensorProperties.create_from_tensor(view),
                    size=self.shape,
                ),
            )
            for offsets, view in self.boxes.items()
        ]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [
            ChunkStorageMetadata(offsets=offsets, sizes=view.shape) for offsets, view in self.boxes.items()
        ]

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        return self.boxes[torch.Size(index.offset)]


def dtensor_local_box(tensor: DTensor) -> tuple[list[int], list[int]]:
    """(global offsets, sizes) of this rank's local tensor, for DTensors of Shard/Replicate placements.

    Shards nest in mesh-dim order with torch.chunk's split (ceil-sized chunks, the last ones short or
    empty), the rule DTensor and FSDP2 follow.
    """
    offsets, sizes = [0] * tensor.ndim, list(tensor.shape)
    mesh = tensor.device_mesh
    for mesh_dim, placement in enumerate(tensor.placements):
        if isinstance(placement, Replicate):
            continue
        if type(placement) is not Shard:  # Partial, or a strided shard whose local rows are not one box
            raise ValueError(
                f"no single local box for placement {placement} of a {tuple(tensor.shape)} DTensor"
            )
        dim, num_chunks = placement.dim, mesh.size(mesh_dim)
        chunk = -(-sizes[dim] // num_chunks)
        start = min(mesh.get_local_rank(mesh_dim) * chunk, sizes[dim])
        offsets[dim] += start
        sizes[dim] = min(chunk, sizes[dim] - start)
    if tuple(sizes) != tuple(tensor.to_local().shape):
        raise ValueError(
            f"local shard {tuple(tensor.to_local().shape)} is not the expected box {tuple(sizes)}"
        )
    return offsets, sizes


def permuted_blocks_view(tensor: DTensor, dim: int, block_order: Sequence[int]) -> LocalBoxes:
    """The canonical tensor behind `tensor`, whose dim `dim` is stored as len(block_order) equal
    blocks in a permuted order (stored block k is canonical block block_order[k]), as boxes of this
    rank's local data: one box per stored block (or part of one) that this rank holds."""
    offsets, sizes = dtensor_local_box(tensor)
    local = tensor.to_local().detach()
    block = tensor.shape[dim] // len(block_order)
    boxes = []
    done = 0
    while done < sizes[dim]:
        stored_block, within = divmod(offsets[dim] + done, block)
        length = min(block - within, sizes[dim] - done)
        box_offsets = list(offsets)
        box_offsets[dim] = block_order[stored_block] * block + within
        boxes.append((box_offsets, local.narrow(dim, done, length)))
        done += length
    return LocalBoxes(tensor, boxes)
