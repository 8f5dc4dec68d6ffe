"""Decoding one image file into RGB, whatever its mode, and resizing it to a square.

Handled: CMYK, grayscale (L, LA), palette (P, with transparency), 1-bit, 16/32-bit grayscale (I;16*, I),
RGBA (alpha dropped), any content under any of the accepted names (Pillow reads the header, not the
extension), EXIF orientation. A file that cannot be decoded raises BadImage with a one-line reason.
"""
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from preprocessing.sources import opened


class BadImage(Exception):
    """The file is not a decodable image (truncated, empty, not an image...)."""


def load_rgb(path, size, pad=0):
    """uint8 array (size, size, 3): the image stretched to a square (aspect ratio not kept); with
    `pad`, stretched to size - 2 * pad and framed by `pad` black pixels on every side (random
    crops of the framed image are then shifted copies of the image, CIFAR's usual augmentation)."""
    inner = size - 2 * pad
    rgb = np.asarray(open_rgb(path, inner).resize((inner, inner), Image.BILINEAR), dtype=np.uint8)
    return np.pad(rgb, ((pad, pad), (pad, pad), (0, 0))) if pad else rgb


def open_rgb(path, size):
    """The decoded RGB image, upright. Raises BadImage if the file cannot be fully decoded.

    JPEGs are decoded at a reduced scale (Image.draft) when they are at least twice as large as
    needed on both sides: several times faster, and the bilinear resize from >= 2x size that follows
    still averages every source pixel, so the result barely differs."""
    with opened(path) as source:  # a path, an archive member or a CIFAR record (sources.py)
        return decode(source, size)


def decode(source, size):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # e.g. corrupt EXIF, large images: still decodable
            with Image.open(source) as im:
                if im.format == 'JPEG':
                    im.draft('RGB', (2 * size, 2 * size))
                im.load()
                return to_rgb(ImageOps.exif_transpose(im))
    except Exception as e:  # noqa: BLE001 -- hostile files fail in many ways (OSError, SyntaxError,
        # struct.error, DecompressionBombError...); all of them mean "not a usable image"
        reason = f'{type(e).__name__}: {e}'
        if isinstance(e, UnidentifiedImageError):  # its message names the path or the file object:
            reason = 'UnidentifiedImageError: cannot identify image file'  # the same for every source
        raise BadImage(' '.join(reason.split())) from None


def to_rgb(im):
    """An RGB image with the colours of any Pillow mode."""
    if im.mode == 'RGB':
        return im
    if im.mode.startswith('I'):
        # 16-bit (I;16, I;16B...) and 32-bit (I, 16-bit PNGs) grayscale: scale 0..65535 to 0..255.
        # Pillow's convert('L') would clip instead, turning most of such an image white.
        a = np.clip(np.asarray(im).astype(np.int64), 0, 65535)
        im = Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8))
    elif im.mode == 'PA' or (im.mode == 'P' and 'transparency' in im.info):
        im = im.convert('RGBA')  # the direct P -> RGB conversion warns about the transparency
    return im.convert('RGB')  # drops alpha (RGBA, LA, PA); CMYK, L, 1, YCbCr... to RGB
