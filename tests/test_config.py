"""The run config: defaults, the shipped example, one-line errors that name file and key path, the hash."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from safecb.config import ConfigError, RunConfig, load_config, parse_config

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str | bytes, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def config_error(path: Path, overrides: dict | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert "\n" not in message, f"not one line: {message!r}"
    assert str(path) in message
    return message


# ---- loading -----------------------------------------------------------------------------------

def test_empty_file_and_empty_mapping_give_the_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == RunConfig()
    assert load_config(write(tmp_path, "{}\n", "b.yaml")) == RunConfig()
    assert parse_config(None) == RunConfig()


def test_values_and_overrides_are_applied(tmp_path):
    path = write(tmp_path, "finetune:\n  steps: 7\njudge:\n  threshold: 0.25\n")
    config = load_config(path, {"stop.patience": 3, "finetune.lr": 0.5})
    assert config.finetune.steps == 7
    assert config.judge.threshold == 0.25
    assert config.stop.patience == 3
    assert config.finetune.lr == 0.5
    # untouched keys keep their defaults
    assert config.finetune.lambda_reg == RunConfig().finetune.lambda_reg


@pytest.mark.parametrize("name", ["tiny.yaml", "janus-pro-1b.yaml"])
def test_shipped_configs_parse(name):
    path = REPO / "configs" / name
    if not path.exists():
        pytest.skip(f"{path} is not in this checkout")
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    config = load_config(path)
    assert isinstance(config, RunConfig)
    assert config.run_id == raw.get("run_id", RunConfig().run_id)  # the file's values, not the defaults


def test_to_yaml_round_trips(tmp_path):
    config = parse_config({"finetune": {"steps": 3}, "categories": ["violence"], "storage": {"run_dir": "/x"}})
    path = write(tmp_path, config.to_yaml())
    assert load_config(path) == config


# ---- one-line errors ---------------------------------------------------------------------------

def test_malformed_yaml(tmp_path):
    path = write(tmp_path, "finetune:\n  steps: [1, 2\n")
    message = config_error(path)
    assert "invalid YAML" in message and "line" in message


def test_unknown_nested_key(tmp_path):
    message = config_error(write(tmp_path, "finetune:\n  lrr: 0.1\n"))
    assert "finetune.lrr" in message
    assert "unknown key" in message


def test_unknown_top_level_key(tmp_path):
    assert "finetun" in config_error(write(tmp_path, "finetun:\n  steps: 1\n"))


def test_wrong_type(tmp_path):
    message = config_error(write(tmp_path, "finetune:\n  steps: many\n"))
    assert "finetune.steps" in message
    assert "integer" in message


def test_out_of_range(tmp_path):
    message = config_error(write(tmp_path, "judge:\n  threshold: 2\n"))
    assert "judge.threshold" in message


def test_bad_override_names_its_key_path(tmp_path):
    message = config_error(write(tmp_path, ""), {"finetune.lrr": 1.0})
    assert "finetune.lrr" in message


def test_cross_field_rule_names_its_section(tmp_path):
    message = config_error(write(tmp_path, "model:\n  backend: janus\n"))
    assert "model" in message and "path" in message


def test_non_utf8_file(tmp_path):
    message = config_error(write(tmp_path, b"run_id: caf\xe9\n"))
    assert "UTF-8" in message


def test_missing_file(tmp_path):
    message = config_error(tmp_path / "nope.yaml")
    assert "not found" in message


def test_top_level_list(tmp_path):
    message = config_error(write(tmp_path, "- a\n- b\n"))
    assert "mapping" in message


@pytest.mark.parametrize("options", [
    {"secret": "hunter2XYZ"},
    {"client_kwargs": {"aws_secret_access_key": "hunter2XYZ"}},
    {"password": "hunter2XYZ"},
    {"token": "hunter2XYZ"},
    {"endpoint_url": "http://h/?key=hunter2XYZ"},
])
def test_storage_options_with_a_secret_are_rejected_without_echoing_it(tmp_path, options):
    path = write(tmp_path, yaml.safe_dump({"storage": {"options": options}}))
    message = config_error(path)
    assert "storage.options" in message
    assert "hunter2XYZ" not in message


def test_storage_options_without_secrets_are_accepted(tmp_path):
    path = write(tmp_path, yaml.safe_dump({"storage": {"options": {"client_kwargs": {"endpoint_url": "http://h:9"}}}}))
    assert load_config(path).storage.options == {"client_kwargs": {"endpoint_url": "http://h:9"}}


def test_storage_options_given_as_a_string_do_not_echo_the_secret(tmp_path):
    path = write(tmp_path, 'storage:\n  options: "secret=hunter2XYZ"\n')
    message = config_error(path)
    assert "hunter2XYZ" not in message


@pytest.mark.parametrize("text, overrides", [
    ("finetune:\n", {"finetune.steps": 3}),  # an empty section header
    ("finetune:\n  steps: 3\n", {"finetune.steps.x": 1}),  # an override below a scalar
])
def test_override_into_a_non_mapping_is_a_config_error_or_fills_the_empty_section(tmp_path, text, overrides):
    path = write(tmp_path, text)
    if text == "finetune:\n":  # an empty section header is an empty section
        assert load_config(path, overrides).finetune.steps == 3
    else:
        assert "finetune.steps" in config_error(path, overrides)


def test_credential_keys_are_refused_wherever_they_sit(tmp_path):
    path = write(tmp_path, yaml.safe_dump({"storage": {"options": {"client_kwargs": {"aws_secret_access_key": "AKIAXYZ"},
                                                                  "key": "AKIA123"}}}))
    message = config_error(path)
    assert "storage.options" in message and "AKIA" not in message


# ---- config_hash -------------------------------------------------------------------------------

def test_config_hash_is_stable_and_ignores_where_the_run_is_stored(tmp_path):
    base = {"finetune": {"steps": 3}, "seed": 5}
    a = parse_config({**base, "storage": {"run_dir": "runs/a"}})
    b = parse_config({**base, "storage": {"run_dir": "s3://bucket/elsewhere", "options": {"anon": True}}})
    assert a.config_hash() == parse_config(dict(base, storage={"run_dir": "runs/a"})).config_hash()
    assert a.config_hash() == b.config_hash()
    # Same run written out and read back: same hash.
    assert load_config(write(tmp_path, a.to_yaml())).config_hash() == a.config_hash()


def test_config_hash_changes_with_the_run():
    a = parse_config({"finetune": {"steps": 3}})
    assert a.config_hash() != parse_config({"finetune": {"steps": 4}}).config_hash()
    assert a.config_hash() != parse_config({"finetune": {"steps": 3}, "seed": 1}).config_hash()



def test_a_relative_run_folder_becomes_absolute_in_the_driver(tmp_path, monkeypatch):
    """Ray Train's workers run in their own folder: the driver sends them an absolute run folder. The
    config itself keeps what the user wrote (`safecb submit` refuses a relative one)."""
    from safecb.config import parse_config
    from safecb.controller import Controller

    monkeypatch.chdir(tmp_path)
    config = parse_config({"storage": {"run_dir": "../runs/x"}})
    assert config.storage.run_dir == "../runs/x"
    assert Controller(config).config.storage.run_dir == str((tmp_path / "../runs/x").absolute())
    assert parse_config({"storage": {"run_dir": "s3://bucket/x"}}).storage.absolute().run_dir == "s3://bucket/x"
