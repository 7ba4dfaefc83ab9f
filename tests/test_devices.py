"""One device type (auto | cpu | cuda | cuda:N) for every setting that names one, resolved against the machine."""
from __future__ import annotations

import pytest
import torch

from training.config import TrainConfig, load_train_config
from training.devices import resolve_device
from training.errors import TrainingError
from training.retrain.settings import load_loop_settings


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:3"])
def test_train_config_accepts_every_device_spelling(device):
    assert TrainConfig(device=device).device == device


def test_an_unknown_device_is_refused_listing_the_choices():
    with pytest.raises(TrainingError, match=r"'device': must be auto, cpu, cuda or cuda:N .*got 'gpu'"):
        load_train_config(None, {"device": "gpu"})


def test_loop_settings_use_the_same_device_type():
    with pytest.raises(TrainingError, match=r"'device': must be auto, cpu, cuda or cuda:N .*env CNNLOOP_DEVICE"):
        load_loop_settings(environ={"CNNLOOP_DEVICE": "gpu"})


def test_cpu_resolves_to_the_cpu():
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_refused_naming_the_device():
    with pytest.raises(TrainingError, match="device 'cuda:0' was asked for but no CUDA GPU is visible"):
        resolve_device("cuda:0")


def test_a_gpu_index_beyond_the_visible_gpus_is_refused_saying_how_many_there_are(monkeypatch):
    # Two GPUs, as torch would report them; the rule under test is ours, not torch's.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(TrainingError, match=r"device 'cuda:2' was asked for but 2 CUDA GPU\(s\) are visible \(cuda:0..cuda:1\)"):
        resolve_device("cuda:2")


def test_resolving_an_unknown_spelling_is_a_training_error():
    with pytest.raises(TrainingError, match="device 'gpu': must be auto, cpu, cuda or cuda:N"):
        resolve_device("gpu")
