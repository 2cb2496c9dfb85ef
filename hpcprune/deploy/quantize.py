"""Post-training dynamic int8 quantization, with torch's own tools, stored without pickles.

    hpcprune export runs/quickstart.h5 --format int8 --out model.int8.safetensors

`torch.ao.quantization.quantize_dynamic` turns every Linear into a dynamically quantized one: int8
weights with one per-tensor scale (symmetric, zero point 0, so a pruned weight stays exactly 0),
activations quantized on the fly at each call. Dynamic quantization has no Conv2d kernel in torch:
convolutions, BatchNorm and biases stay float32.

A quantized model's own state_dict holds packed C++ objects that safetensors cannot store, so the
file holds plain tensors instead: `<module>.weight::int8`, `<module>.weight::scale` and
`<module>.weight::zero_point` for each quantized Linear, everything else as the float model has it.
`restore_int8` quantizes a float model of the same architecture and puts the stored integers back,
bit for bit. (torch marks torch.ao.quantization deprecated in favour of torchao; its warnings are
silenced here, where they are expected.)
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping

import torch
from torch import nn

QUANTIZED = {nn.Linear}  # module kinds quantize_dynamic converts
PARTS = ("int8", "scale", "zero_point")
SEPARATOR = "::"


def quantize_int8(model: nn.Module) -> nn.Module:
    """A dynamically quantized copy of the float `model` (CPU, eval mode)."""
    with _quiet():
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(model.cpu().eval(), QUANTIZED, dtype=torch.qint8, inplace=False)


def int8_tensors(quantized: nn.Module, float_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors to store: the float model's state with each quantized weight as int8 + scale + zero point."""
    tensors = dict(float_state)
    for name, module in _quantized_linears(quantized):
        weight, bias = module._weight_bias()
        del tensors[f"{name}.weight"]
        tensors[f"{name}.weight{SEPARATOR}int8"] = weight.int_repr().contiguous()
        tensors[f"{name}.weight{SEPARATOR}scale"] = torch.tensor([weight.q_scale()], dtype=torch.float64)
        tensors[f"{name}.weight{SEPARATOR}zero_point"] = torch.tensor([weight.q_zero_point()], dtype=torch.int64)
        if bias is not None:
            tensors[f"{name}.bias"] = bias.detach().clone()
    return tensors


def float_state_of(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A float state dict from stored int8 tensors (quantized weights dequantized), to build the model on."""
    state = {name: tensor for name, tensor in tensors.items() if SEPARATOR not in name}
    for name, parts in _stored_weights(tensors):
        state[name] = (parts["int8"].to(torch.float64) - float(parts["zero_point"])).mul(float(parts["scale"])).float()
    return state


def restore_int8(float_model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> nn.Module:
    """Quantize `float_model` (already loaded with `float_state_of`) and set the stored int8 weights exactly."""
    quantized = quantize_int8(float_model)
    stored = dict(_stored_weights(tensors))
    with _quiet():
        for name, module in _quantized_linears(quantized):
            parts = stored[f"{name}.weight"]
            scale, zero_point = float(parts["scale"]), int(parts["zero_point"])
            # q * scale in float32 is within a few ulp of it, far inside the rounding interval of q.
            weight = torch.quantize_per_tensor((parts["int8"].float() - zero_point) * scale,
                                               scale, zero_point, torch.qint8)
            module.set_weight_bias(weight, tensors.get(f"{name}.bias"))
    return quantized


def int8_parameters(module: nn.Module) -> list[torch.Tensor]:
    """The integer weights and float bias of a dynamically quantized Linear (none for any other module);
    they are not `parameters()` of the quantized model, which holds them packed."""
    if not _is_quantized_linear(module):
        return []
    weight, bias = module._weight_bias()
    return [weight.int_repr()] + ([] if bias is None else [bias.detach()])


def _quantized_linears(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    return ((name, module) for name, module in model.named_modules() if _is_quantized_linear(module))


def _is_quantized_linear(module: nn.Module) -> bool:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return isinstance(module, DynamicLinear)


def _stored_weights(tensors: Mapping[str, torch.Tensor]) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    for name in tensors:
        if name.endswith(f"{SEPARATOR}int8"):
            weight = name.removesuffix(f"{SEPARATOR}int8")
            yield weight, {part: tensors[f"{weight}{SEPARATOR}{part}"] for part in PARTS}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torch's deprecation notices for torch.ao.quantization, which this module uses on purpose."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated.*")
        warnings.filterwarnings("ignore", message=r".*quantize_per_tensor.*deprecated.*")
        yield
