"""A Hugging Face model that is never whole in memory: the skeleton, one block at a time, and the rest on use.

    hpcprune prune --config configs/llm_wanda.yaml     # schedule.kind: sequential

`LazyModel` holds the meta skeleton (hpcprune.models.skeleton) and the folder's tensors
(hpcprune.models.tensor_files). `load_block(b)` reads block b's parameters (and the persistent
buffers its files hold) in their stored dtype, converts them to float32 on the device, and puts them
into the skeleton; `release_block(b)` puts meta tensors back, so the memory goes with them. The
modules outside the blocks (embeddings, final norm, LM head) are loaded by `outer_modules_on_call`:
a forward pre-hook reads a module's parameters the first time the model's own forward calls it, and
everything loaded is released when the block ends. A run that stops at the first block never reads
the head; a tied head is the embeddings' tensor, read once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from hpcprune.errors import UsageError
from hpcprune.models.hf import folder_of
from hpcprune.models.skeleton import build_skeleton, find_blocks, is_causal_lm
from hpcprune.models.tensor_files import TensorFiles


class LazyModel:
    def __init__(self, name: str, blocks_path: str | None, device: torch.device):
        self.name, self.device = name, device
        self.model = build_skeleton(name)
        self.blocks_path, self.blocks = find_blocks(self.model, blocks_path, name)
        self.files = TensorFiles(folder_of(name))
        self.causal = is_causal_lm(self.model)
        self._prefix = getattr(self.model, "base_model_prefix", "") or ""
        self._ties = _tied_names(self.model)  # parameter name -> every name of the same parameter

    def __len__(self) -> int:
        return len(self.blocks)

    def block_name(self, index: int) -> str:
        """The state-dict prefix of block `index`, e.g. "model.layers.3"."""
        return f"{self.blocks_path}.{index}"

    def load_block(self, index: int) -> nn.Module:
        """Block `index` with its weights in float32 on the device (read from the folder now)."""
        block = self.blocks[index]
        self._load(self.block_name(index), block, recurse=True)
        return block

    def release_block(self, index: int) -> None:
        self._release(self.block_name(index), self.blocks[index], recurse=True)

    def materialised(self) -> list[str]:
        """Names of the parameters that are not on the meta device now (what a rank holds)."""
        return [name for name, parameter in self.model.named_parameters() if parameter.device.type != "meta"]

    @contextlib.contextmanager
    def outer_modules_on_call(self) -> Iterator[None]:
        """Within: a module outside the blocks is loaded when the model first calls it; released at the end."""
        outer = [(path, module) for path, module in self.model.named_modules()
                 if not _inside(path, self.blocks_path) and _holds_tensors(module)]
        loaded: list[tuple[str, nn.Module]] = []

        def load_on_call(path: str):
            def hook(module: nn.Module, args) -> None:
                if any(parameter.device.type == "meta" for parameter in module.parameters(recurse=False)):
                    self._load(path, module, recurse=False)
                    loaded.append((path, module))
            return hook

        handles = [module.register_forward_pre_hook(load_on_call(path)) for path, module in outer]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            for path, module in loaded:
                self._release(path, module, recurse=False)

    def _load(self, path: str, module: nn.Module, *, recurse: bool) -> None:
        """Read `module`'s parameters (and the stored persistent buffers) and put them in the skeleton."""
        wanted = {}
        for leaf, parameter in module.named_parameters(recurse=recurse):
            full = f"{path}.{leaf}" if path else leaf
            wanted[full] = self.files.resolve(full, self._ties.get(full, ()), self._prefix)
        for leaf, _ in _persistent_buffers(module, recurse):
            full = f"{path}.{leaf}" if path else leaf
            try:
                wanted[full] = self.files.resolve(full, (), self._prefix)
            except UsageError:  # a persistent buffer the checkpoint does not hold keeps its computed value
                continue
        stored = self.files.read(set(wanted.values()))
        for full, source in wanted.items():
            tensor = stored[source]
            tensor = tensor.to(device=self.device, dtype=torch.float32 if tensor.is_floating_point() else tensor.dtype)
            self._put(full, tensor)

    def _release(self, path: str, module: nn.Module, *, recurse: bool) -> None:
        """Every parameter of `module` (and the names tied to them) back on meta."""
        for leaf, parameter in list(module.named_parameters(recurse=recurse)):
            if parameter.device.type != "meta":
                full = f"{path}.{leaf}" if path else leaf
                self._put(full, torch.empty_like(parameter, device="meta"))

    def _put(self, full: str, tensor: torch.Tensor) -> None:
        """Set tensor `full` (and every name tied to it: one parameter object, as in the skeleton)."""
        owner_path, _, leaf = full.rpartition(".")
        owner = self.model.get_submodule(owner_path)
        if leaf in owner._buffers:
            owner._buffers[leaf] = tensor
            return
        parameter = nn.Parameter(tensor, requires_grad=False)
        for name in (full, *self._ties.get(full, ())):
            holder_path, _, holder_leaf = name.rpartition(".")
            self.model.get_submodule(holder_path)._parameters[holder_leaf] = parameter


def _tied_names(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Parameter name -> the other names of the same parameter object (tied weights)."""
    names: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    return {name: tuple(other for other in group if other != name)
            for group in names.values() if len(group) > 1 for name in group}


def _persistent_buffers(module: nn.Module, recurse: bool) -> Iterator[tuple[str, torch.Tensor]]:
    modules = module.named_modules() if recurse else [("", module)]
    for path, holder in modules:
        for leaf, buffer in holder._buffers.items():
            if buffer is not None and leaf not in holder._non_persistent_buffers_set:
                yield (f"{path}.{leaf}" if path else leaf), buffer


def _holds_tensors(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


def _inside(path: str, blocks_path: str) -> bool:
    return path == blocks_path or path.startswith(blocks_path + ".")
