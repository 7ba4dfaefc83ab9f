"""How an image file becomes model input: defined once, used by training, export and the service.

torch-free on purpose: the serving image carries only PIL and numpy. The policy is "resize the
shorter side to `resize_size`, centre-crop a `crop_size` square"; training caches the resize_size
square and crops (randomly or centrally) from it, so the eval crop is bit-identical to serving.
"""
from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile

# A 50 MP limit keeps decompression bombs out while passing any real photo.
MAX_PIXELS = 50_000_000


class ImageDecodeError(ValueError):
    """The bytes are not a decodable image (empty, truncated, not an image, too many pixels)."""


class TooManyPixels(ImageDecodeError):
    """The header declares more pixels than the limit the caller gave; nothing was decoded."""

    def __init__(self, width: int, height: int, limit: int):
        super().__init__(f"image is {width}x{height} = {width * height} pixels, over the {limit} limit")
        self.width, self.height, self.limit = width, height, limit


@dataclass(frozen=True)
class ResizePolicy:
    crop_size: int = 224
    resize_size: int = 256

    def __post_init__(self) -> None:
        if not (16 <= self.crop_size <= self.resize_size <= 4096):
            raise ValueError(
                f"resize policy needs 16 <= crop_size ({self.crop_size}) <= resize_size "
                f"({self.resize_size}) <= 4096"
            )

    @classmethod
    def for_crop(cls, crop_size: int) -> "ResizePolicy":
        # 0.875 crop ratio: the ImageNet convention the pretrained backbones were evaluated with.
        return cls(crop_size=crop_size, resize_size=int(round(crop_size / 0.875)))

    @classmethod
    def from_bundle(cls, metadata: dict) -> "ResizePolicy":
        """The policy a bundle's metadata records (its `preprocess` entry)."""
        pre = metadata["preprocess"]
        return cls(crop_size=int(pre["crop_size"]), resize_size=int(pre["resize_size"]))

    def as_dict(self) -> dict:
        return asdict(self)


def _reason(e: Exception) -> str:
    # PIL messages name the file object ("<_io.BytesIO object at 0x...>"): clients need the reason only.
    import re

    return re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e)).strip()


def _open(data: bytes | Path | str, max_pixels: int = MAX_PIXELS) -> Image.Image:
    if isinstance(data, (str, Path)):
        data = Path(data).read_bytes()
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        if w * h > max_pixels:
            raise TooManyPixels(w, h, max_pixels)
        return img
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"decompression bomb refused: {_reason(e)}") from None
    except Exception as e:  # PIL raises many types for bad bytes; all mean "not an image"
        raise ImageDecodeError(f"not a decodable image: {_reason(e)}") from None


def decode_resized_square(data: bytes | Path | str, size: int, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode to RGB, resize the shorter side to `size`, centre-crop a size x size square (uint8 HWC)."""
    img = _open(data, max_pixels)
    try:
        # draft() lets libjpeg decode at 1/2, 1/4, 1/8 scale: large JPEGs decode several times faster.
        if img.format == "JPEG":
            img.draft("RGB", (size, size))
        img = img.convert("RGB")
        w, h = img.size
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((nw, nh), Image.BILINEAR, reducing_gap=None)
        rows, cols = center_crop_window(nh, nw, size)
        img = img.crop((cols.start, rows.start, cols.stop, rows.stop))
        arr = np.asarray(img, dtype=np.uint8)
    except ImageDecodeError:
        raise
    except Exception as e:
        raise ImageDecodeError(f"not a decodable image: {_reason(e)}") from None
    return np.ascontiguousarray(arr)


def center_crop_window(height: int, width: int, crop_size: int) -> tuple[slice, slice]:
    """(rows, columns) of the centred crop_size square: the one crop geometry training and serving share.

    Floor division, not torchvision's round(): round() is half-to-even, so whenever
    resize_size - crop_size is 3 mod 4 (crop 160 -> resize 183) it lands one pixel away from this."""
    top, left = (height - crop_size) // 2, (width - crop_size) // 2
    return slice(top, top + crop_size), slice(left, left + crop_size)


def center_crop(square: np.ndarray, crop_size: int) -> np.ndarray:
    """Centre crop of an HWC (or NHWC) uint8 square; training's tensor crop uses the same window."""
    rows, cols = center_crop_window(square.shape[-3], square.shape[-2], crop_size)
    return square[..., rows, cols, :]


def load_model_input(data: bytes | Path | str, policy: ResizePolicy, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """One image file -> uint8 HWC array at the model's resolution, exactly as training evaluated."""
    return np.ascontiguousarray(center_crop(decode_resized_square(data, policy.resize_size, max_pixels), policy.crop_size))
