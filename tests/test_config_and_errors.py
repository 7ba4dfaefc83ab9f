"""Bad input gets a clear error that names the problem and the fix; config layers resolve in order."""
import pytest
from typer.testing import CliRunner

from training.cli import app
from training.config import load_train_config
from training.data.sources import discover
from training.errors import TrainingError
from training.train import train
from tests.training_data import fast_config, make_digits, write_png

runner = CliRunner()


def test_config_precedence_is_defaults_then_yaml_then_env_then_flags(tmp_path, monkeypatch):
    (tmp_path / "c.yaml").write_text("lr: 0.5\nepochs: 7\nbatch_size: 8\n")
    monkeypatch.setenv("CNNLOOP_TRAIN_EPOCHS", "9")
    monkeypatch.setenv("CNNLOOP_TRAIN_BATCH_SIZE", "4")
    cfg = load_train_config(tmp_path / "c.yaml", {"batch_size": 2, "seed": None})
    assert (cfg.lr, cfg.epochs, cfg.batch_size, cfg.seed, cfg.optimizer) == (0.5, 9, 2, 0, "adamw")


def test_negative_learning_rate_is_refused_naming_the_field():
    with pytest.raises(TrainingError, match="'lr': Input should be greater than 0"):
        load_train_config(None, {"lr": -0.1})


def test_unknown_yaml_key_is_refused(tmp_path):
    (tmp_path / "c.yaml").write_text("learning_rate: 0.1\n")
    with pytest.raises(TrainingError, match="unknown setting 'learning_rate'"):
        load_train_config(tmp_path / "c.yaml")


def test_yaml_that_is_not_a_mapping_is_refused(tmp_path):
    (tmp_path / "c.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(TrainingError, match="must hold a mapping"):
        load_train_config(tmp_path / "c.yaml")


def test_unknown_backbone_is_refused_with_suggestions(tmp_path):
    data = make_digits(tmp_path / "d", digits=(0, 1), per_class=5)
    with pytest.raises(TrainingError, match="unknown backbone 'resnet19'.*Did you mean: .*resnet18"):
        train(data, tmp_path / "run", fast_config(backbone="resnet19"), show_progress=False)


def test_missing_weights_file_is_a_clear_error(tmp_path):
    data = make_digits(tmp_path / "d", digits=(0, 1), per_class=5)
    with pytest.raises(TrainingError, match="does not exist"):
        train(data, tmp_path / "run", fast_config(backbone="resnet18", weights=str(tmp_path / "nope.pth")), show_progress=False)


def test_backbone_without_offline_weights_asks_for_a_weights_file(tmp_path):
    data = make_digits(tmp_path / "d", digits=(0, 1), per_class=5)
    with pytest.raises(TrainingError, match="no weights that ship offline: pass --weights PATH"):
        train(data, tmp_path / "run", fast_config(backbone="resnet18"), show_progress=False)


def test_weights_of_another_architecture_are_refused(tmp_path):
    import torch
    import torchvision

    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    data = make_digits(tmp_path / "d", digits=(0, 1), per_class=5)
    with pytest.raises(TrainingError, match="does not fit backbone 'mobilenet_v3_large'"):
        train(data, tmp_path / "run", fast_config(backbone="mobilenet_v3_large", weights=str(tmp_path / "r18.pth")), show_progress=False)


def test_torchvision_backbone_trains_from_a_user_weights_file(tmp_path):
    import torch
    import torchvision

    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    data = make_digits(tmp_path / "d", digits=(0, 1), per_class=8)
    m = train(data, tmp_path / "run", fast_config(backbone="resnet18", weights=str(tmp_path / "r18.pth"), epochs=1), show_progress=False)
    assert "val" in m


def test_single_class_is_refused(tmp_path):
    write_png(tmp_path / "d" / "only" / "a.png")
    with pytest.raises(TrainingError, match="at least 2"):
        discover(tmp_path / "d")


def test_empty_class_folder_is_refused(tmp_path):
    write_png(tmp_path / "d" / "a" / "x.png")
    (tmp_path / "d" / "b").mkdir()
    with pytest.raises(TrainingError, match=r"class folder .*b holds no image files"):
        discover(tmp_path / "d")


def test_val_class_unknown_to_train_is_refused(tmp_path):
    for split, cls in (("train", "a"), ("train", "b"), ("val", "a"), ("val", "c")):
        write_png(tmp_path / "d" / split / cls / "x.png")
    with pytest.raises(TrainingError, match="classes not in the training data: c"):
        discover(tmp_path / "d")


def test_cli_exits_2_with_one_clear_line_on_bad_flags(tmp_path):
    data = make_digits(tmp_path / "d", digits=(0, 1), per_class=5)
    result = runner.invoke(app, ["train", str(data), "--out", str(tmp_path / "r"), "--lr", "-1"])
    assert result.exit_code == 2
    assert "'lr': Input should be greater than 0" in result.output
    assert "Traceback" not in result.output


def test_cli_missing_data_folder_exits_2(tmp_path):
    result = runner.invoke(app, ["train", str(tmp_path / "missing"), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_cli_help_lists_every_recipe_flag():
    result = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    for flag in ("--strategy", "--backbone-lr-ratio", "--label-smoothing", "--balance", "--patience", "--ema-decay", "--no-amp"):
        assert flag in result.output


def test_cli_data_digits_writes_an_imagefolder(tmp_path):
    result = runner.invoke(app, ["data", "digits", "--out", str(tmp_path / "dg"), "--limit-per-class", "3", "--json"])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "dg").glob("*/*.png"))) == 30


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_train_on_cuda_without_a_gpu_exits_2_before_reading_the_data(tmp_path):
    # The data folder is missing too: the device error coming out shows the device was checked first.
    result = runner.invoke(app, ["train", str(tmp_path / "missing"), "--out", str(tmp_path / "r"), "--device", "cuda"])
    assert result.exit_code == 2
    assert "device 'cuda'" in result.output and "does not exist" not in result.output


@pytest.mark.parametrize("command", [["cv", "missing"], ["evaluate", "missing-run", "missing"]], ids=lambda c: c[0])
def test_an_unknown_device_exits_2_before_reading_the_data(tmp_path, command):
    result = runner.invoke(app, [command[0], *(str(tmp_path / p) for p in command[1:]), "--device", "gpu"])
    assert result.exit_code == 2
    assert "must be auto, cpu, cuda or cuda:N" in result.output and "does not exist" not in result.output
