"""sensor_msgs/Image and CompressedImage messages to RGB arrays, for bag messages (rosbags) and live rclpy
messages alike (the same field names), so the node and the offline tools see identical pixels."""

from __future__ import annotations

from types import SimpleNamespace

import cv2
import numpy as np
from rosbags.image import message_to_cvimage
from rosbags.image.image import ImageError, to_cvtype

from tscm_ros.errors import TscmError

MIN_IMAGE_SIDE = 2  # pixels: an image one pixel high or wide is no camera image (OpenCV's ORB pyramid fails on it)


class ImageDecodeError(TscmError):
    """One image message cannot be converted (bad size, step, data length, encoding or compression); ``kind``
    names the problem in a few words (``zero size``, ``wrong step``, ...) for counting."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


def image_message_to_rgb(msg) -> np.ndarray:
    """HxWx3 uint8 RGB from a sensor_msgs/Image or CompressedImage (rosbags or rclpy message).

    Raises ImageDecodeError for a zero-size image or one under ``MIN_IMAGE_SIDE`` pixels a side, a row step
    too small for the width, data shorter than step * height, an unknown encoding, an encoding OpenCV cannot
    convert at that size (odd-width yuv422), or compressed data that does not decode.
    """
    if hasattr(msg, "format"):
        data = np.frombuffer(bytes(msg.data), dtype=np.uint8)
        if data.size == 0:
            raise ImageDecodeError(f"compressed image ({msg.format or 'no format'}) has no data",
                                   "empty compressed data")
        image = cv2.imdecode(data, cv2.IMREAD_COLOR)
        if image is None:
            raise ImageDecodeError(f"compressed image ({msg.format or 'no format'}, {data.size} bytes) does not decode",
                                   "undecodable compressed image")
        _check_size(image.shape[1], image.shape[0])
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)

    height, width, step, encoding = int(msg.height), int(msg.width), int(msg.step), str(msg.encoding)
    _check_size(width, height)
    try:
        depth_bits, _, _, channels = to_cvtype(encoding)
    except ImageError:
        raise ImageDecodeError(f"unknown image encoding {encoding!r}", "unknown encoding") from None
    row_bytes = width * channels * depth_bits // 8
    if encoding in ("nv12", "nv21"):
        raise ImageDecodeError(f"image encoding {encoding!r} is not supported", "unsupported encoding")
    if step < row_bytes:
        raise ImageDecodeError(f"image step {step} is smaller than width {width} x {channels * depth_bits // 8} bytes",
                               "wrong step")
    data = bytes(msg.data)
    if len(data) < step * height:
        raise ImageDecodeError(
            f"image data has {len(data)} bytes, expected step {step} x height {height} = {step * height}",
            "truncated data")
    if step != row_bytes or len(data) != step * height:  # padded rows: repack to what the converter expects
        rows = np.frombuffer(data, dtype=np.uint8, count=step * height).reshape(height, step)
        data = rows[:, :row_bytes].tobytes()
    packed = SimpleNamespace(height=height, width=width, encoding=encoding,
                             is_bigendian=bool(msg.is_bigendian), step=row_bytes, data=data)
    try:
        rgb = message_to_cvimage(packed, "rgb8")
    except (ImageError, cv2.error) as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise ImageDecodeError(f"cannot convert {encoding!r} ({width}x{height}) to RGB: {reason}",
                               "conversion failed") from None
    return np.ascontiguousarray(rgb, dtype=np.uint8)


def _check_size(width: int, height: int) -> None:
    if height <= 0 or width <= 0:
        raise ImageDecodeError(f"image has zero size ({width}x{height})", "zero size")
    if min(height, width) < MIN_IMAGE_SIDE:
        raise ImageDecodeError(f"image of {width}x{height} is too small (under {MIN_IMAGE_SIDE} pixels a side)",
                               "too small")
