"""One loader and one error shape for the three settings objects (training config, service, drift/retrain)."""
from __future__ import annotations

import re

import pytest

from service.errors import ConfigError
from service.settings import load_service_settings
from training.config import load_train_config
from training.errors import TrainingError
from training.retrain.settings import load_loop_settings

# (loader, its room's error, its env prefix): env-only input, so each sees exactly what it is given.
LOADERS = {
    "train": (lambda config=None, environ=None: load_train_config(config, environ=environ or {}), TrainingError, "CNNLOOP_TRAIN_"),
    "service": (lambda config=None, environ=None: load_service_settings(config, environ=environ or {}), ConfigError, "CNNLOOP_"),
    "loop": (lambda config=None, environ=None: load_loop_settings(config, environ=environ or {}), TrainingError, "CNNLOOP_"),
}
# A field each object has, and a value every one of them refuses.
BAD_FIELD = {"train": ("epochs", "0"), "service": ("batch_max_size", "0"), "loop": ("epochs", "0")}


def error_of(room: str, config=None, environ=None) -> str:
    load, error, _ = LOADERS[room]
    with pytest.raises(error) as e:
        load(config, environ)
    return str(e.value)


@pytest.mark.parametrize("room", LOADERS)
def test_a_bad_value_names_field_message_value_and_variable_in_every_room(room):
    field, value = BAD_FIELD[room]
    variable = LOADERS[room][2] + field.upper()
    message = error_of(room, environ={variable: value})
    assert re.search(rf"'{field}': Input should be greater than or equal to 1 \(got '{value}', env {variable}\)", message), message


@pytest.mark.parametrize("room", LOADERS)
def test_an_unknown_yaml_key_is_named_with_the_known_settings_in_every_room(room, tmp_path):
    (tmp_path / "s.yaml").write_text("epochz: 3\n")
    message = error_of(room, config=tmp_path / "s.yaml")
    known = re.search(r"known settings: (.*)$", message)
    assert "unknown setting 'epochz'" in message and known, message
    assert BAD_FIELD[room][0] in known.group(1).split(", ")


def test_a_token_value_is_masked():
    message = error_of("service", environ={"CNNLOOP_API_TOKEN": "short-secret"})
    assert "'api_token': tokens must be at least 16 characters" in message
    assert "(got ***, env CNNLOOP_API_TOKEN)" in message and "short-secret" not in message


def test_a_check_across_fields_is_shown_by_its_message():
    message = error_of("train", environ={"CNNLOOP_TRAIN_VAL_FRACTION": "0.5", "CNNLOOP_TRAIN_TEST_FRACTION": "0.45"})
    assert message == ("invalid training config: val_fraction (0.5) + test_fraction (0.45) "
                       "leaves under 10% for training; lower them")


def test_every_error_of_one_load_is_reported_together():
    message = error_of("loop", environ={"CNNLOOP_ALPHA": "3", "CNNLOOP_WINDOW": "1"})
    assert "env CNNLOOP_ALPHA" in message and "env CNNLOOP_WINDOW" in message


def test_none_overrides_mean_not_given():
    cfg = load_train_config(None, {"epochs": None, "lr": 0.5}, environ={"CNNLOOP_TRAIN_EPOCHS": "7"})
    assert (cfg.epochs, cfg.lr) == (7, 0.5)


def test_the_given_environment_replaces_the_process_environment(monkeypatch):
    monkeypatch.setenv("CNNLOOP_TRAIN_EPOCHS", "9")
    assert load_train_config(None, environ={}).epochs == 12
