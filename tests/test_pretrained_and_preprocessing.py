"""The default backbone is genuinely ImageNet-pretrained, and evaluation sees exactly what serving sees."""
import io

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_images

from exporters.preprocess import ImageDecodeError, ResizePolicy, center_crop, load_model_input
from training.data.augment import eval_crop, train_transform
from training.model.backbones import get_backbone_spec, load_pretrained_network
from training.errors import TrainingError
from training.data.sources import LabeledFiles
from training.data.decode import decode_files

PALACE, DAISY, HONEYCOMB = 698, 985, 599


def _png_bytes(arr) -> bytes:
    b = io.BytesIO()
    Image.fromarray(arr).save(b, "PNG")
    return b.getvalue()


@pytest.fixture(scope="module")
def sample_photos():
    """scikit-learn ships two real photos: a Chinese palace and a daisy-like flower."""
    imgs = load_sample_images()
    return {name.rsplit("/", 1)[-1]: _png_bytes(a) for name, a in zip(imgs.filenames, imgs.images)}


def _imagenet_top(net, spec, data: bytes, k=3) -> list[int]:
    x = torch.from_numpy(load_model_input(data, ResizePolicy.for_crop(224))).permute(2, 0, 1)[None].float() / 255
    mean, std = torch.tensor(spec.mean).view(1, 3, 1, 1), torch.tensor(spec.std).view(1, 3, 1, 1)
    with torch.no_grad():
        return net.eval()((x - mean) / std)[0].topk(k).indices.tolist()


# The flower photo is a close-up of a seed head: Lite0 calls it a daisy, Lite1/2 a honeycomb.
@pytest.mark.parametrize("name,flower", [("efficientnet_lite0", DAISY), ("efficientnet_lite1", HONEYCOMB),
                                         ("efficientnet_lite2", HONEYCOMB)])
def test_offline_backbones_imagenet_head_recognises_real_photos(sample_photos, name, flower):
    spec = get_backbone_spec(name)
    net, _ = load_pretrained_network(spec, "default")
    assert _imagenet_top(net, spec, sample_photos["china.jpg"], 1) == [PALACE]
    assert _imagenet_top(net, spec, sample_photos["flower.jpg"], 1) == [flower]


def test_random_init_does_not_recognise_them(sample_photos):
    spec = get_backbone_spec("efficientnet_lite0")
    torch.manual_seed(0)
    net, _ = load_pretrained_network(spec, "none")
    assert _imagenet_top(net, spec, sample_photos["china.jpg"], 1) != [PALACE]
    assert _imagenet_top(net, spec, sample_photos["flower.jpg"], 1) != [DAISY]


def test_training_eval_crop_is_pixel_identical_to_serving_preprocessing(tmp_path, sample_photos):
    path = tmp_path / "x" / "china.png"
    path.parent.mkdir()
    path.write_bytes(sample_photos["china.jpg"])
    policy = ResizePolicy.for_crop(224)
    decoded, _ = decode_files(LabeledFiles([path], np.array([0]), ["x"]), policy.resize_size)
    trained_on = eval_crop(decoded.images, policy)[0].permute(1, 2, 0).numpy()
    served = load_model_input(path.read_bytes(), policy)
    assert served.shape == (224, 224, 3) and np.array_equal(trained_on, served)


@pytest.fixture(scope="module")
def china_file(tmp_path_factory, sample_photos):
    path = tmp_path_factory.mktemp("x") / "x" / "china.png"
    path.parent.mkdir()
    path.write_bytes(sample_photos["china.jpg"])
    return LabeledFiles([path], np.array([0]), ["x"])


# Margins (resize - crop) of 32, 9, 23 and 1 pixels: odd ones are where two crop formulas part.
@pytest.mark.parametrize("policy", [ResizePolicy.for_crop(224), ResizePolicy.for_crop(64), ResizePolicy.for_crop(160),
                                    ResizePolicy(crop_size=16, resize_size=17)], ids=str)
def test_training_tensor_crop_and_serving_array_crop_give_identical_pixels(china_file, policy):
    decoded, _ = decode_files(china_file, policy.resize_size)
    trained_on = eval_crop(decoded.images, policy).permute(0, 2, 3, 1).numpy()
    served = center_crop(decoded.images.permute(0, 2, 3, 1).numpy(), policy.crop_size)
    assert served.shape == (1, policy.crop_size, policy.crop_size, 3) and np.array_equal(trained_on, served)


def test_the_unaugmented_train_preset_trains_on_the_evaluation_crop(china_file):
    # Crop 160 from a 183 square: torchvision's CenterCrop rounds 11.5 to 12, the served crop starts at 11.
    policy = ResizePolicy.for_crop(160)
    decoded, _ = decode_files(china_file, policy.resize_size)
    square = decoded.images[0]
    assert torch.equal(train_transform("none", policy)(square), eval_crop(square, policy))


@pytest.mark.parametrize("data, reason", [
    (b"", "0 bytes"), (b"hello, not an image", "not a decodable image"), (b"\x89PNG\r\n\x1a\n\x00\x00", "not a decodable image"),
])
def test_undecodable_bytes_raise_image_decode_error(data, reason):
    with pytest.raises(ImageDecodeError, match=reason):
        load_model_input(data, ResizePolicy.for_crop(64))


def test_truncated_jpeg_is_refused(sample_photos):
    b = io.BytesIO()
    Image.open(io.BytesIO(sample_photos["china.jpg"])).save(b, "JPEG")
    with pytest.raises(ImageDecodeError):
        load_model_input(b.getvalue()[: len(b.getvalue()) // 2], ResizePolicy.for_crop(64))


def test_order_matched_weights_with_a_tensor_missing_are_refused(tmp_path):
    spec = get_backbone_spec("efficientnet_lite0")
    original = torch.load(spec.default_weights(), map_location="cpu", weights_only=True)
    short = dict(list(original.items())[:-1])  # original key names, one tensor fewer than timm's
    torch.save(short, tmp_path / "short.pth")
    expected = fr"has {len(original) - 1} tensors, backbone 'efficientnet_lite0' expects {len(original)}"
    with pytest.raises(TrainingError, match=expected):
        load_pretrained_network(spec, str(tmp_path / "short.pth"))


def test_a_backbone_resizes_at_the_recipe_image_size_or_else_at_its_own_default_crop():
    spec = get_backbone_spec("efficientnet_lite0")
    assert spec.resize_policy(None) == ResizePolicy.for_crop(spec.default_crop)
    assert spec.resize_policy(64) == ResizePolicy(crop_size=64, resize_size=73)
