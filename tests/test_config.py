"""Config: YAML + --set overrides -> validated tree; every bad input is one line naming key and file."""

import pytest

from hpcprune.config import RunConfig, load_config, load_config_text
from hpcprune.errors import UsageError


def write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(path, overrides=()):
    with pytest.raises(UsageError) as caught:
        load_config(path, overrides)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_defaults_are_valid_and_safe():
    config = load_config(None)
    assert config.prune.rule == "global" and 0 <= config.prune.sparsity < 1
    assert config.output.path.endswith(".h5")


def test_yaml_and_overrides_are_merged(tmp_path):
    path = write(tmp_path, "prune: {sparsity: 0.5}\nfinetune: {epochs: 2}\n")
    config = load_config(path, ["prune.sparsity=0.75", "finetune.optimizer.lr=1e-3", "prune.exclude=[fc1.weight]"])
    assert config.prune.sparsity == 0.75
    assert config.finetune.epochs == 2
    assert config.finetune.optimizer.lr == pytest.approx(1e-3)
    assert config.prune.exclude == ["fc1.weight"]


def test_config_round_trips_through_its_yaml(tmp_path):
    config = load_config(write(tmp_path, "prune: {sparsity: 0.3}\n"), ["schedule.kind=iterative", "schedule.rounds=2"])
    assert load_config_text(config.to_yaml(), "archive") == config


def test_config_is_frozen():
    config = load_config(None)
    with pytest.raises(Exception):
        config.prune.sparsity = 0.5


@pytest.mark.parametrize(
    "text, key",
    [
        ("prune: {sparsity: 1.0}\n", "prune.sparsity"),
        ("prune: {sparsity: -0.1}\n", "prune.sparsity"),
        ("prune: {sparsityy: 0.5}\n", "prune.sparsityy"),
        ("bogus: 1\n", "bogus"),
        ("finetune: {epochs: -1}\n", "finetune.epochs"),
        ("finetune: {epochs: ten}\n", "finetune.epochs"),
        ("finetune: {optimizer: {lr: 0}}\n", "finetune.optimizer.lr"),
        ("finetune: {optimizer: {name: rmsprop}}\n", "finetune.optimizer.name"),
        ("prune: {criterion: psychic}\n", "prune.criterion"),
        ("prune: {rule: threshold}\n", "prune"),
        ("data: {batch_size: 0}\n", "data.batch_size"),
        ("schedule: {kind: oneshot, rounds: 3}\n", "schedule"),
        ("model: {name: 3}\n", "model.name"),
    ],
)
def test_bad_values_name_the_key_and_the_file(tmp_path, text, key):
    path = write(tmp_path, text)
    message = error_of(path)
    assert message.startswith(f"{path}: {key}")


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "prune:\n  sparsity: [0.5\n")
    message = error_of(path)
    assert str(path) in message and "malformed YAML" in message and "line" in message


def test_top_level_must_be_a_mapping(tmp_path):
    assert "mapping" in error_of(write(tmp_path, "- 1\n- 2\n"))


def test_missing_file_is_named(tmp_path):
    assert "nope.yaml" in error_of(tmp_path / "nope.yaml")


@pytest.mark.parametrize("override, fragment", [
    ("prune.sparsity", "key.path=value"),
    ("prune.sparsity.x=1", "prune.sparsity"),
    ("data.x.y=1", "data.x: unknown key"),
    ("prune.nothing=1", "prune.nothing: unknown key"),
    ("prune.sparsity=2", "prune.sparsity"),
])
def test_bad_overrides(override, fragment):
    assert fragment in error_of(None, [override])


def test_empty_file_means_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == RunConfig()
