"""Model registry, user models and checkpoint files: `python -m pytest tests/test_models.py`."""

from __future__ import annotations

import textwrap

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from hpcprune.config import ModelConfig
from hpcprune.errors import UsageError
from hpcprune.models.builders import (
    MODELS,
    build_model,
    load_checkpoint,
    load_state_file,
    save_checkpoint,
)


def model(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(name=name, kwargs=kwargs))


class Opaque:
    """Not a tensor: saving it makes torch.save pickle code that weights_only loading must refuse."""

    def __init__(self):
        self.payload = 1


# --- registry and builders -------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MODELS))
def test_builtin_model_maps_images_to_logits(name):
    logits = model(name)(torch.randn(3, 1, 28, 28))
    assert logits.shape == (3, 10)


def test_builtin_models_are_the_documented_ones():
    assert {"lenet300", "lenet5", "resnet8"} <= set(MODELS)


def test_lenet300_layer_names_and_shapes():
    shapes = {name: tuple(p.shape) for name, p in model("lenet300").named_parameters()}
    assert shapes["fc1.weight"] == (300, 784)
    assert shapes["fc2.weight"] == (100, 300)
    assert shapes["fc3.weight"] == (10, 100)


def test_lenet5_layer_shapes():
    shapes = {name: tuple(p.shape) for name, p in model("lenet5").named_parameters()}
    assert shapes["conv1.weight"] == (6, 1, 5, 5)
    assert shapes["conv2.weight"] == (16, 6, 5, 5)
    assert shapes["fc1.weight"] == (120, 400)
    assert shapes["fc3.weight"] == (10, 84)


def test_resnet8_has_shortcut_convs_only_where_the_shape_changes():
    names = {name for name, _ in model("resnet8").named_parameters()}
    assert "layer2.0.downsample.0.weight" in names and "layer3.0.downsample.0.weight" in names
    assert not any(name.startswith("layer1.0.downsample") for name in names)
    convs = [m for m in model("resnet8").modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(convs) == 1 + 3 * 2 + 2 + 1  # stem, two per block, two shortcuts, head


def test_shape_and_config_kwargs_reach_the_builder():
    torch.manual_seed(0)
    net = build_model(ModelConfig(name="resnet8", kwargs={"width": 8}), in_channels=3, num_classes=7)
    assert net.fc.weight.shape == (7, 32)
    assert net(torch.randn(2, 3, 28, 28)).shape == (2, 7)


def test_unknown_kwarg_is_a_usage_error_naming_it():
    with pytest.raises(UsageError, match="depth"):
        model("lenet300", depth=4)


def test_unknown_name_lists_the_builtins():
    with pytest.raises(UsageError) as error:
        model("lenet9000")
    assert "lenet9000" in str(error.value)
    assert all(name in str(error.value) for name in MODELS)


def write_module(tmp_path, monkeypatch, name: str, source: str) -> None:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))


def test_user_model_from_package_module_callable(tmp_path, monkeypatch):
    write_module(tmp_path, monkeypatch, "my_user_models", """
        from torch import nn

        def tiny(in_channels, num_classes, hidden=5):
            return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * 28 * 28, hidden), nn.Linear(hidden, num_classes))
    """)
    net = build_model(ModelConfig(name="my_user_models:tiny", kwargs={"hidden": 7}), num_classes=4)
    assert net[1].weight.shape == (7, 784)
    assert net(torch.randn(2, 1, 28, 28)).shape == (2, 4)


def test_user_model_gets_only_the_arguments_it_accepts(tmp_path, monkeypatch):
    write_module(tmp_path, monkeypatch, "my_fixed_model", """
        from torch import nn

        def fixed():
            return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    """)
    assert build_model(ModelConfig(name="my_fixed_model:fixed"))(torch.randn(1, 1, 28, 28)).shape == (1, 10)


def test_unimportable_module_is_named(tmp_path, monkeypatch):
    with pytest.raises(UsageError, match="no_such_package_xyz"):
        model("no_such_package_xyz.models:net")


def test_missing_callable_is_named(tmp_path, monkeypatch):
    write_module(tmp_path, monkeypatch, "my_empty_module", "X = 1\n")
    with pytest.raises(UsageError, match="'net'"):
        model("my_empty_module:net")


def test_builder_must_return_a_module(tmp_path, monkeypatch):
    write_module(tmp_path, monkeypatch, "my_bad_builder", "def net():\n    return 42\n")
    with pytest.raises(UsageError, match="not a torch.nn.Module"):
        model("my_bad_builder:net")


# --- checkpoints -----------------------------------------------------------------------------------


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    state_b = b.state_dict()
    for name, tensor in a.state_dict().items():
        assert torch.equal(tensor, state_b[name]), name


def test_safetensors_round_trip_includes_buffers(tmp_path):
    source = model("resnet8")
    source.train()(torch.randn(4, 1, 28, 28))  # moves the BatchNorm running statistics off their defaults
    save_checkpoint(source, tmp_path / "resnet8.safetensors")
    target = model("resnet8")
    torch.nn.init.zeros_(target.fc.weight)
    load_checkpoint(target, tmp_path / "resnet8.safetensors")
    assert_same_state(source, target)


def test_save_accepts_a_state_dict_and_replaces_atomically(tmp_path):
    path = tmp_path / "sub" / "state.safetensors"
    save_checkpoint({"w": torch.ones(2, 3)}, path)
    save_checkpoint({"w": torch.zeros(2, 3)}, path)
    assert torch.equal(load_state_file(path)["w"], torch.zeros(2, 3))
    assert [p.name for p in path.parent.iterdir()] == ["state.safetensors"]  # no temporary left behind


def test_save_handles_shared_and_non_contiguous_tensors(tmp_path):
    weight = torch.randn(4, 6)
    state = {"a": weight, "tied": weight, "transposed": weight.t(), "row": weight[1]}
    save_checkpoint(state, tmp_path / "shared.safetensors")
    loaded = load_file(str(tmp_path / "shared.safetensors"))
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor), name


@pytest.mark.parametrize("wrap", [None, "state_dict", "model"])
def test_torch_save_state_dict_loads(tmp_path, wrap):
    source = model("lenet5")
    content = source.state_dict() if wrap is None else {wrap: source.state_dict(), "epoch": 3}
    torch.save(content, tmp_path / "lenet5.pt")
    target = model("lenet5")
    torch.nn.init.zeros_(target.conv1.weight)
    load_checkpoint(target, tmp_path / "lenet5.pt")
    assert_same_state(source, target)


def test_shape_mismatch_names_the_tensor_and_both_shapes(tmp_path):
    path = tmp_path / "narrow.safetensors"
    save_checkpoint(model("lenet300", hidden=(200, 100)), path)
    with pytest.raises(UsageError) as error:
        load_checkpoint(model("lenet300"), path)
    message = str(error.value)
    assert "narrow.safetensors" in message and "'fc1.weight'" in message
    assert "[200, 784]" in message and "[300, 784]" in message


def test_missing_tensor_is_named(tmp_path):
    state = model("lenet300").state_dict()
    del state["fc2.bias"]
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(UsageError, match=r"partial\.pt.*missing.*'fc2\.bias'"):
        load_checkpoint(model("lenet300"), tmp_path / "partial.pt")


def test_unexpected_tensor_is_named(tmp_path):
    state = {**model("lenet300").state_dict(), "extra.weight": torch.zeros(1)}
    save_checkpoint(state, tmp_path / "extra.safetensors")
    with pytest.raises(UsageError, match=r"unexpected.*'extra\.weight'"):
        load_checkpoint(model("lenet300"), tmp_path / "extra.safetensors")


def test_file_that_needs_unpickling_code_is_refused(tmp_path):
    torch.save({"fc1.weight": torch.zeros(1), "extra": Opaque()}, tmp_path / "code.pt")
    with pytest.raises(UsageError, match=r"code\.pt.*unpickling"):
        load_state_file(tmp_path / "code.pt")


def test_missing_file_is_named(tmp_path):
    with pytest.raises(UsageError, match=r"absent\.safetensors.*no such file"):
        load_checkpoint(model("lenet300"), tmp_path / "absent.safetensors")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_truncated_file_is_named(tmp_path, suffix):
    whole = tmp_path / f"whole{suffix}"
    if suffix == ".pt":
        torch.save(model("lenet300").state_dict(), whole)
    else:
        save_checkpoint(model("lenet300"), whole)
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(whole.read_bytes()[:1000])
    with pytest.raises(UsageError, match=rf"cut\{suffix}.*unreadable"):
        load_checkpoint(model("lenet300"), cut)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_load_state_file_reads_only_the_named_tensors(tmp_path, suffix):
    state = {"a": torch.arange(3.0), "b": torch.ones(2), "c": torch.zeros(4)}
    path = tmp_path / f"state{suffix}"
    if suffix == ".pt":
        torch.save(state, path)
    else:
        save_checkpoint(state, path)
    subset = load_state_file(path, names=["c", "a"])
    assert list(subset) == ["c", "a"] and torch.equal(subset["a"], state["a"])
    with pytest.raises(UsageError, match=rf"state\{suffix}.*'d'"):
        load_state_file(path, names=["d"])


def test_file_without_tensors_is_refused(tmp_path):
    torch.save({"epoch": 3}, tmp_path / "notes.pt")
    with pytest.raises(UsageError, match=r"notes\.pt.*no state dict"):
        load_state_file(tmp_path / "notes.pt")
