"""Step 3 — model: build a network by name and load or save its weights.

    hpcprune prune --config configs/quickstart.yaml --set model.name=lenet5

`model.name` is a key of `MODELS`, `hf:<folder>` (a Hugging Face style folder, hpcprune.models.hf), or
`package.module:callable` (the module is imported only then, so `torchvision:resnet18` works when
torchvision is installed). Builders receive `in_channels` and
`num_classes` when they accept them, then `model.kwargs`. Checkpoints are read with safetensors or
`torch.load(weights_only=True)`: nothing is unpickled, so a checkpoint can never run code.
"""

from __future__ import annotations

import importlib
import inspect
import os
import pickle
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from hpcprune.archive.atomic import replace_atomically
from hpcprune.config import ModelConfig
from hpcprune.errors import UsageError
from hpcprune.models.hf import hf_builder, is_hf_model

# ---------------------------------------------------------------------------------------- models


class LeNet300(nn.Module):
    """LeNet-300-100: a fully connected net on flattened images."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28,
                 hidden: tuple[int, int] = (300, 100)):
        super().__init__()
        first, second = hidden
        self.fc1 = nn.Linear(in_channels * image_size * image_size, first)
        self.fc2 = nn.Linear(first, second)
        self.fc3 = nn.Linear(second, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


class LeNet5(nn.Module):
    """LeNet-5 for 28x28 inputs (the first conv pads by 2, as for the original 32x32)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, kernel_size=5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, kernel_size=5)
        side = (image_size // 2 - 4) // 2  # after pool, conv 5x5 without padding, pool
        self.fc1 = nn.Linear(16 * side * side, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


class BasicBlock(nn.Module):
    """Two 3x3 conv+BN layers with a residual connection (1x1 conv+BN when the shape changes)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + shortcut)


class ResNet8(nn.Module):
    """Stem + three one-block stages (width, 2*width, 4*width channels) + linear head: 8 layers."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = nn.Sequential(BasicBlock(width, width))
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, stride=2))
        self.layer3 = nn.Sequential(BasicBlock(2 * width, 4 * width, stride=2))
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


# Adding a built-in model is one entry here.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "lenet300": LeNet300,
    "lenet5": LeNet5,
    "resnet8": ResNet8,
}


def build_model(cfg: ModelConfig, *, in_channels: int = 1, num_classes: int = 10) -> nn.Module:
    """The model `cfg.name` names, with fresh weights (the caller seeds torch first)."""
    builder = _resolve_builder(cfg.name)
    kwargs = _builder_kwargs(builder, cfg, in_channels=in_channels, num_classes=num_classes)
    if cfg.name in MODELS and not cfg.kwargs:
        model = builder(**kwargs)  # our code with our arguments: a failure here is a bug, with its traceback
    else:
        try:
            model = builder(**kwargs)
        except UsageError:
            raise
        except Exception as error:  # the user's code, or a built-in given the user's model.kwargs
            raise UsageError(f"model {cfg.name!r}: building it with {kwargs} failed "
                             f"({type(error).__name__}: {_first_line(error)})") from None
    if not isinstance(model, nn.Module):
        raise UsageError(f"model {cfg.name!r} returned {type(model).__name__}, not a torch.nn.Module")
    if is_hf_model(cfg.name):  # its weights come from the folder's checkpoint
        for name, tensor in model.state_dict().items():
            require_finite(tensor, f"model.name {cfg.name!r}: tensor {name!r}")
    return model


def check_takes_input(model: nn.Module, name: str, input_shape: tuple[int, ...], num_classes: int) -> None:
    """One forward pass of a batch of two zero images: the model must take the data's images and
    return one score per class, or training would fail later, deep inside torch."""
    batch = torch.zeros(2, *input_shape)
    was_training = model.training
    model.eval()  # no batch statistics, no dropout: the pass changes no buffer and draws no random number
    try:
        with torch.no_grad():
            logits = model(batch)
    except Exception as error:  # the model's own code, given the data's shape
        raise UsageError(f"model {name!r} does not take the data's images of shape {list(batch.shape)} "
                         f"({type(error).__name__}: {_first_line(error)})") from None
    finally:
        model.train(was_training)
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (2, num_classes):
        got = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise UsageError(f"model {name!r} returns {got} for images of shape {list(batch.shape)}; "
                         f"training needs [2, {num_classes}], one score per class")


# Builders whose module moved when hpcprune was grouped into floors: configs stored in archives
# written before still name the old path, and must keep working.
MOVED_BUILDERS = {"hpcprune.export:exported_model": "hpcprune.deploy.export:exported_model"}


def _resolve_builder(name: str) -> Callable[..., nn.Module]:
    name = MOVED_BUILDERS.get(name, name)
    if name in MODELS:
        return MODELS[name]
    if is_hf_model(name):  # hf:<folder>, a Hugging Face style folder
        return hf_builder(name)
    module_name, sep, attribute = name.partition(":")
    if not sep or not module_name or not attribute:
        raise UsageError(
            f"model.name: unknown model {name!r}; built-in: {', '.join(sorted(MODELS))}, "
            "or give 'package.module:callable'"
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # the user's module: any failure to import it is a user problem
        raise UsageError(f"model.name {name!r}: cannot import module {module_name!r} ({error})") from None
    builder = getattr(module, attribute, None)
    if not callable(builder):
        raise UsageError(f"model.name {name!r}: module {module_name!r} has no callable {attribute!r}")
    return builder


def _builder_kwargs(builder: Callable[..., nn.Module], cfg: ModelConfig, **shape: int) -> dict:
    """in_channels/num_classes where the builder takes them, then model.kwargs; checked before the call."""
    try:
        signature = inspect.signature(builder)
    except (TypeError, ValueError):  # some C callables have no signature: pass only what the user gave
        return dict(cfg.kwargs)
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
    kwargs = {key: value for key, value in shape.items() if takes_any or key in signature.parameters}
    kwargs.update(cfg.kwargs)
    try:
        signature.bind(**kwargs)
    except TypeError as error:
        raise UsageError(f"model.kwargs for {cfg.name!r}: {error}") from None
    return kwargs


# ------------------------------------------------------------------------------------ checkpoints


def load_state_file(path: str | os.PathLike, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file (CPU), without touching any model.

    `names` restricts the result to those tensors; a safetensors file then reads only them from disk
    (a rank loads just the tensors it scores).
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint {path}: no such file")
    if path.suffix == ".safetensors":
        state = _load_safetensors(path, names)
    else:
        state = _state_dict_of(_torch_load(path), path)
        state = state if names is None else {name: _pick(state, name, path) for name in names}
    for name, tensor in state.items():
        require_finite(tensor, f"checkpoint {path}: tensor {name!r}")
    return state


def require_finite(tensor: torch.Tensor, what: str) -> None:
    """Weights with NaN or infinity make every score, loss and mask after them meaningless: refuse them.

    One `aminmax` pass decides (NaN and ±inf reach the extremes) and allocates nothing the size of the
    tensor: `isfinite(...).all()` would, and on large checkpoints those one-byte-per-weight buffers
    left the heap fragmented and grew a rank's resident memory with the model.
    """
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return
    low, high = torch.aminmax(tensor)
    if not (bool(torch.isfinite(low)) and bool(torch.isfinite(high))):
        bad = "NaN" if bool(torch.isnan(tensor).any()) else "infinity"
        raise UsageError(f"{what} holds {bad} ({int((~torch.isfinite(tensor)).sum())} of {tensor.numel()} values)")


def _load_safetensors(path: Path, names: Iterable[str] | None) -> dict[str, torch.Tensor]:
    try:
        if names is None:
            return load_file(str(path), device="cpu")
        with safe_open(str(path), framework="pt", device="cpu") as file:
            present = set(file.keys())
            return {name: file.get_tensor(_require(name, present, path)) for name in names}
    except UsageError:
        raise
    except Exception as error:  # SafetensorError, OSError: truncated or not a safetensors file
        raise UsageError(f"checkpoint {path}: unreadable safetensors file ({error})") from None


def _pick(state: Mapping[str, torch.Tensor], name: str, path: Path) -> torch.Tensor:
    return state[_require(name, state, path)]


def _require(name: str, present, path: Path) -> str:
    if name not in present:
        raise UsageError(f"checkpoint {path}: no tensor {name!r}")
    return name


def _torch_load(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only" in str(error).lower():
            raise UsageError(
                f"checkpoint {path}: refused, it needs unpickling code (objects other than tensors); "
                "save model.state_dict() instead, or convert it to .safetensors"
            ) from None
        raise UsageError(f"checkpoint {path}: unreadable ({_first_line(error)})") from None
    except Exception as error:  # torch raises RuntimeError/EOFError/KeyError on truncated or foreign files
        raise UsageError(f"checkpoint {path}: unreadable ({type(error).__name__}: {_first_line(error)})") from None


def _state_dict_of(content: object, path: Path) -> dict[str, torch.Tensor]:
    """A plain state dict, or one stored under "state_dict"/"model" (training-script checkpoints)."""
    if _is_tensor_dict(content):
        return dict(content)
    if isinstance(content, Mapping):
        for key in ("state_dict", "model"):
            if _is_tensor_dict(content.get(key)):
                return dict(content[key])
    raise UsageError(
        f"checkpoint {path}: holds no state dict (expected name -> tensor, or a 'state_dict'/'model' entry of them)"
    )


def _is_tensor_dict(value: object) -> bool:
    return (
        isinstance(value, Mapping)
        and len(value) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())
    )


def load_checkpoint(model: nn.Module, path: str | os.PathLike) -> None:
    """Copy the tensors of `path` into `model`; every key must match in name and shape."""
    state = load_state_file(path)
    expected = model.state_dict()
    _check_same_keys(expected, state, path)
    for name, tensor in expected.items():  # model order: the first mismatch a reader would look for
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise UsageError(
                f"checkpoint {path}: tensor {name!r} has shape {list(state[name].shape)} in the file "
                f"but {list(tensor.shape)} in the model"
            )
    model.load_state_dict(state, strict=True)


def _check_same_keys(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], path) -> None:
    missing = [name for name in expected if name not in state]
    unexpected = [name for name in state if name not in expected]
    if missing:
        raise UsageError(f"checkpoint {path}: missing tensor(s) {_few(missing)} that the model has")
    if unexpected:
        raise UsageError(f"checkpoint {path}: unexpected tensor(s) {_few(unexpected)} that the model lacks")


def save_checkpoint(model_or_state: nn.Module | Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write a safetensors file atomically: a reader sees the old file or the complete new one."""
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    tensors = _standalone_cpu_tensors(state)
    with replace_atomically(path) as temporary:
        save_file(tensors, str(temporary), metadata={"format": "pt"})


def _standalone_cpu_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, none sharing memory (safetensors refuses shared storage, e.g. tied weights)."""
    seen_storages: set[tuple[int, int]] = set()
    tensors = {}
    for name, tensor in state.items():
        tensor = tensor.detach().cpu().contiguous()
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key in seen_storages or tensor.nbytes != storage.nbytes():
            tensor = tensor.clone()  # a tied or viewed tensor: store its own copy
        seen_storages.add(key)
        tensors[name] = tensor
    return tensors


def _few(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(repr(name) for name in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
