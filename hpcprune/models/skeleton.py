"""A Hugging Face model as a skeleton: parameters on the meta device, buffers computed, blocks found.

    hpcprune prune --config configs/llm_wanda.yaml     # model.name: hf:<folder>, schedule.kind: sequential

The folder's config.json builds the model class it names (`architectures[0]`, else AutoModel) with
every parameter on the meta device: shapes and dtypes, no memory. Buffers are computed for real on
the CPU (rotary `inv_freq`, BERT's `position_ids`), because the model's own forward reads them and
nothing in the checkpoint holds the non-persistent ones. That is what accelerate's
`init_empty_weights(include_buffers=False)` does, by moving each parameter to meta as it is
registered; it is written out here because it is a dozen lines and accelerate is not a dependency.

The repeated blocks are found without a table of architectures: the largest `nn.ModuleList` (by
parameter count) whose children are all of one class. When another list holds half as many
parameters or more (an encoder beside a decoder, a vision tower), the choice is the user's:
`model.blocks` names the dotted path, and the error lists the candidates.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

from torch import nn

from hpcprune.errors import UsageError
from hpcprune.models.hf import _transformers, folder_of

AMBIGUOUS_SHARE = 0.5  # another list at least this share of the largest one's parameters: ask the user


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Within: every parameter a module registers lands on the meta device; buffers stay real."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, parameter: nn.Parameter | None) -> None:
        register(module, name, parameter)
        if parameter is not None:
            module._parameters[name] = nn.Parameter(parameter.to("meta"), requires_grad=False)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def build_skeleton(name: str) -> nn.Module:
    """The model of folder `hf:<folder>` with its parameters on meta, in float32, in eval mode, no cache."""
    transformers = _transformers()
    folder = folder_of(name)
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as error:
        raise UsageError(f"model.name {name!r}: cannot read {folder / 'config.json'} ({error})") from None
    config.use_cache = False  # blocks run one window at a time and keep no key/value cache
    architecture = (getattr(config, "architectures", None) or ["AutoModel"])[0]
    model_class = getattr(transformers, architecture, None)
    with parameters_on_meta():
        model = model_class(config) if model_class is not None else transformers.AutoModel.from_config(config)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # a head stored as the embeddings: one parameter (not tied on meta by the constructor)
    return model.float().eval().requires_grad_(False)


def is_causal_lm(model: nn.Module) -> bool:
    """A model class transformers lists for causal language modelling (LLaMA, OPT, GPT-2, Qwen2, ...)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return type(model).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def find_blocks(model: nn.Module, path: str | None, name: str) -> tuple[str, nn.ModuleList]:
    """(dotted path, list) of the model's repeated blocks: `path` if given, else found (see above)."""
    if path is not None:
        try:
            blocks = model.get_submodule(path)
        except AttributeError:
            raise UsageError(f"model.blocks {path!r}: {name} has no such module") from None
        if not isinstance(blocks, nn.ModuleList) or not len(blocks):
            raise UsageError(f"model.blocks {path!r}: a non-empty nn.ModuleList is expected, not {type(blocks).__name__}")
        return path, blocks
    candidates = sorted(_block_lists(model), key=lambda found: -found[2])
    if not candidates:
        raise UsageError(f"model.name {name!r}: no nn.ModuleList of identical blocks with parameters found; "
                         "name the blocks with model.blocks")
    best_path, best, size = candidates[0]
    rivals = [(path, count) for path, _, count in candidates[1:]
              if not _nested(path, best_path) and count >= AMBIGUOUS_SHARE * size]
    if rivals:
        listed = ", ".join(f"{path} ({count} parameters)" for path, count in [(best_path, size), *rivals])
        raise UsageError(f"model.name {name!r}: its repeated blocks are ambiguous: {listed}; "
                         "choose one with model.blocks")
    return best_path, best


def _block_lists(model: nn.Module) -> Iterator[tuple[str, nn.ModuleList, int]]:
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and len({type(child) for child in module}) == 1:
            count = sum(math.prod(parameter.shape) for parameter in module.parameters())
            if count:
                yield path, module, count


def _nested(path: str, other: str) -> bool:
    return path.startswith(other + ".") or other.startswith(path + ".")
