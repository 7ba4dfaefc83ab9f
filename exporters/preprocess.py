"""How an image file becomes model input: defined once, used by training, export and the service.

torch-free on purpose: the serving image carries only PIL and numpy. The policy is "resize the
shorter side to `resize_size`, centre-crop a `crop_size` square"; training caches the resize_size
square and crops (randomly or centrally) from it, so the eval crop is bit-identical to serving.

Phone photos are read as they display: the EXIF Orientation (all 8 values) is applied to the resized
image, and HEIC/HEIF (pillow-heif) and AVIF (Pillow's own plugin) decode like any other format.
"""
from __future__ import annotations

import io
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pillow_heif
from PIL import Image, ImageFile
from PIL.JpegImagePlugin import JpegImageFile

# HEIC is the iPhone default. Registering is a dict entry in PIL's plugin table, so doing it here, once,
# means every caller of this module (training, export, the service) decodes HEIF the same way.
pillow_heif.register_heif_opener()

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


_ORIENTATION_TAG = 0x0112  # EXIF / TIFF "Orientation"
_T = Image.Transpose
# Orientation value -> the transpose that turns the stored pixels into the image as it displays.
_TO_DISPLAYED = {2: _T.FLIP_LEFT_RIGHT, 3: _T.ROTATE_180, 4: _T.FLIP_TOP_BOTTOM, 5: _T.TRANSPOSE,
                 6: _T.ROTATE_270, 7: _T.TRANSVERSE, 8: _T.ROTATE_90}
_SWAPS_AXES = frozenset({5, 6, 7, 8})  # the stored rows show as columns
# Stored axes that run backwards once displayed (EXIF's "0th row at the bottom", "0th column at the right").
_REVERSED_AXES = {2: "x", 3: "xy", 4: "y", 6: "y", 7: "xy", 8: "x"}


def _orientation_in_exif_block(raw: bytes) -> int | None:
    """The Orientation entry of a raw EXIF block's first IFD; None when it is not plainly there.

    Pillow's getexif() builds a whole tag directory: about 0.1 ms a photo here, right after a decode
    has emptied the caches, against 0.12 ms for the whole 2% budget. The tag is one 12-byte entry."""
    tiff = raw[6:] if raw.startswith(b"Exif\x00\x00") else raw
    order = {b"II": "<", b"MM": ">"}.get(tiff[:2])
    try:
        if order is None:
            return None
        (first_ifd,) = struct.unpack_from(order + "I", tiff, 4)
        (entries,) = struct.unpack_from(order + "H", tiff, first_ifd)
        for i in range(min(entries, (len(tiff) - first_ifd - 2) // 12)):
            tag, kind, count, value = struct.unpack_from(order + "HHIH", tiff, first_ifd + 2 + 12 * i)
            if tag == _ORIENTATION_TAG:
                return value if kind == 3 and count == 1 else None  # 3: SHORT, the type EXIF prescribes
    except struct.error:
        return None
    return None


def _orientation(img: Image.Image) -> int:
    """The EXIF Orientation of a decoded file, 1..8; 1 ("as stored") when absent or unreadable."""
    if img.format == "HEIF":
        # libheif already applied the container's irot/imir, and pillow-heif resets the EXIF copy to 1:
        # iPhones write both, so honouring the EXIF tag as well would rotate twice. (Pillow's AVIF
        # plugin is the other way round: pixels as stored, irot/imir reported as this tag.)
        return 1
    raw = img.info.get("exif")
    value = _orientation_in_exif_block(raw) if isinstance(raw, bytes) else None
    if value is None:  # no plain entry: Pillow also looks in TIFF tags, PNG text chunks and XMP
        try:
            value = img.getexif().get(_ORIENTATION_TAG, 1)
        except Exception:  # a corrupt or absurd EXIF block: show the pixels as stored rather than refuse the photo
            return 1
    return value if isinstance(value, int) and value in _TO_DISPLAYED else 1


def _resample_axis(img: Image.Image, axis: int, length: int) -> Image.Image:
    size = list(img.size)
    if size[axis] == length:
        return img
    size[axis] = length
    return img.resize(tuple(size), Image.BILINEAR, reducing_gap=None)


def _stored_crop_box(width: int, height: int, size: int, orientation: int) -> tuple[int, int, int, int]:
    """The box of stored pixels that, once transposed, is `center_crop_window`'s square of the displayed image.

    On an axis that runs backwards the window is mirrored: an odd margin's larger half goes first."""
    rows, cols = center_crop_window(height, width, size)
    reversed_axes = _REVERSED_AXES.get(orientation, "")
    left = width - size - cols.start if "x" in reversed_axes else cols.start
    top = height - size - rows.start if "y" in reversed_axes else rows.start
    return left, top, left + size, top + size


def _resized_square(img: Image.Image, size: int, orientation: int = 1) -> np.ndarray:
    """RGB image as stored -> displayed shorter side resized to `size`, centre size x size crop (uint8 HWC).

    The one resize + crop geometry of this module: files and arrays both come through here."""
    # Stored axes that show as the displayed width and height.
    x_axis, y_axis = (1, 0) if orientation in _SWAPS_AXES else (0, 1)
    w, h = img.size[x_axis], img.size[y_axis]
    scale = size / min(w, h)
    # Two one-axis passes, displayed width first: Pillow's one-call resize picks its pass order from the
    # sizes (rounding to 8 bits in between), so resizing a rotated photo's stored pixels in one call can
    # land 1 grey level away from resizing the upright photo. Then crop, then transpose: only the final
    # square is turned (~0.25 ms for a 256 square here, ~0.45 ms for the 341x256 image it came from).
    img = _resample_axis(img, x_axis, max(size, round(w * scale)))
    img = _resample_axis(img, y_axis, max(size, round(h * scale)))
    img = img.crop(_stored_crop_box(img.width, img.height, size, orientation))
    if orientation in _TO_DISPLAYED:
        img = img.transpose(_TO_DISPLAYED[orientation])
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))


def decode_resized_square(data: bytes | Path | str, size: int, max_pixels: int = MAX_PIXELS, *,
                          apply_orientation: bool = True) -> np.ndarray:
    """Decode to RGB as the photo displays (EXIF Orientation applied), resize the shorter side to `size`,
    centre-crop a size x size square (uint8 HWC).

    `apply_orientation=False` reads the pixels as stored; it exists for bench/exif_cost.py only."""
    img = _open(data, max_pixels)
    try:
        # draft() lets libjpeg decode at 1/2, 1/4, 1/8 scale: large JPEGs decode several times faster.
        # Phone JPEGs often open as MPO (a JPEG subclass), so test the class, not the format name.
        # The requested box is square, so the scale it picks does not depend on the orientation.
        if isinstance(img, JpegImageFile):
            img.draft("RGB", (size, size))
        rgb = img.convert("RGB")
        # Read after decoding: PNG may keep its eXIf chunk after the pixels.
        orientation = _orientation(img) if apply_orientation else 1
        return _resized_square(rgb, size, orientation)
    except ImageDecodeError:
        raise
    except Exception as e:
        raise ImageDecodeError(f"not a decodable image: {_reason(e)}") from None


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


def _check_rgb_array(pixels: np.ndarray, max_pixels: int) -> None:
    if not isinstance(pixels, np.ndarray):
        raise ImageDecodeError(f"expected a numpy array of shape (H, W, 3), got {type(pixels).__name__}")
    if pixels.dtype != np.uint8:
        raise ImageDecodeError(f"pixels are {pixels.dtype}, expected uint8 RGB (0-255); "
                               "scale to 0-255 and convert with .astype(np.uint8)")
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ImageDecodeError(f"pixels have shape {pixels.shape}, expected (H, W, 3) RGB; "
                               "stack grey images to 3 channels, drop alpha with [..., :3]")
    h, w = pixels.shape[:2]
    if h < 1 or w < 1:
        raise ImageDecodeError(f"pixels have shape {pixels.shape}: an empty image has nothing to classify")
    if w * h > max_pixels:
        raise TooManyPixels(w, h, max_pixels)


def load_array_input(pixels: np.ndarray, policy: ResizePolicy, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """A decoded uint8 RGB (H, W, 3) array -> model input, exactly what `load_model_input` gives for a
    lossless file of the same pixels."""
    _check_rgb_array(pixels, max_pixels)
    square = _resized_square(Image.fromarray(np.ascontiguousarray(pixels)), policy.resize_size)
    return np.ascontiguousarray(center_crop(square, policy.crop_size))
