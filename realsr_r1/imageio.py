"""Reading and writing images the way restoration users need it.

Every reader path ends in the same `LoadedImage`: float32 RGB in [0, 1], alpha kept apart, the
original mode and bit depth remembered so the output can be written back the same way (a 16-bit
grey PNG comes out as a 16-bit grey PNG). Problems become `ImageReadError` with a one-line message;
callers print it and go on with the next file. Writes are atomic: a temp file in the same folder
renamed over the target, so an interrupted run never leaves a half-written output behind; outputs
get the usual mode for the user's umask, as `cp` would give them.
"""

from __future__ import annotations

import io
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import png  # pypng: 16-bit colour PNGs (Pillow reads them as 8-bit)
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
DEFAULT_MAX_PIXELS = 4096 * 4096
# zlib level of written PNGs: OpenCV's default, which Real-ESRGAN's scripts write with. Level 6
# (Pillow's) makes files ~12 % smaller and took 4x longer on a 512² result (about 110 ms a photo).
PNG_COMPRESS_LEVEL = 1

# We enforce our own pixel limit before decoding; Pillow's own check would only warn below 2x its
# limit and would refuse some legitimate large scans.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageReadError(Exception):
    """An input that cannot be used; str() is a one-line message without the path."""


@dataclass
class LoadedImage:
    rgb: np.ndarray  # float32 HxWx3 in [0, 1]
    alpha: np.ndarray | None = None  # float32 HxW in [0, 1]
    mode: str = "RGB"  # "RGB" or "L": how to write the result back
    bit_depth: int = 8  # 8 or 16
    format: str = ""  # e.g. "PNG", "JPEG"
    path: Path | None = None
    icc_profile: bytes | None = None
    notes: list[str] = field(default_factory=list)  # non-fatal facts, e.g. "first frame of 12"

    @property
    def size(self) -> tuple[int, int]:
        """(width, height), as PIL says it."""
        return self.rgb.shape[1], self.rgb.shape[0]

    @property
    def has_alpha(self) -> bool:
        return self.alpha is not None


def _png_bit_depth(head: bytes) -> int | None:
    """Bit depth from a PNG's IHDR chunk (None if not a PNG)."""
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR" and len(head) >= 25:
        return head[24]
    return None


def _read_png16(data: bytes) -> LoadedImage:
    reader = png.Reader(bytes=data)
    width, height, rows, info = reader.asDirect()
    planes = info["planes"]
    arr = np.vstack([np.asarray(r, dtype=np.uint16) for r in rows]).reshape(height, width, planes)
    arr = arr.astype(np.float32) / 65535.0
    color = planes in (3, 4)
    rgb = arr[..., :3] if color else np.repeat(arr[..., :1], 3, axis=2)
    alpha = arr[..., -1] if planes in (2, 4) else None
    return LoadedImage(
        np.ascontiguousarray(rgb), alpha, "RGB" if color else "L", 16, "PNG", icc_profile=None
    )


def read_image(path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> LoadedImage:
    """Read any common image into a LoadedImage, or raise ImageReadError with a one-line reason."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise ImageReadError("is a directory, not an image") from None
    except OSError as e:
        raise ImageReadError(f"cannot read file ({e.strerror or e})") from None
    if not data:
        raise ImageReadError("empty file (0 bytes)")
    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageReadError("not a recognised image format") from None
    except Exception as e:  # Pillow raises many types for broken headers
        raise ImageReadError(f"unreadable image header ({e})") from None
    width, height = im.size
    if width < 1 or height < 1:
        raise ImageReadError(f"image has no pixels ({width}x{height})")
    if max_pixels and width * height > max_pixels:
        raise ImageReadError(
            f"image is {width}x{height} = {width * height:,} pixels, over the limit of "
            f"{max_pixels:,} (raise it with --max-pixels)"
        )
    try:
        loaded = _decode(im, data)
    except ImageReadError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageReadError(f"truncated or corrupt image data ({e})") from None
    loaded.path = path
    loaded.format = loaded.format or (im.format or "")
    return loaded


def _decode(im: Image.Image, data: bytes) -> LoadedImage:
    notes = []
    n_frames = getattr(im, "n_frames", 1)
    if n_frames > 1:
        notes.append(f"animated image: used the first of {n_frames} frames")
        im.seek(0)
    im.load()  # decode now so truncation surfaces here, not later
    bit_depth = _png_bit_depth(data[:32])
    if bit_depth == 16 and im.mode not in ("I;16", "I;16B", "I"):
        # 16-bit colour PNG: Pillow would give us 8 bits, read it again with pypng.
        loaded = _read_png16(data)
        loaded.icc_profile = im.info.get("icc_profile")
        loaded.notes = notes
        return loaded
    icc = im.info.get("icc_profile")
    im = ImageOps.exif_transpose(im)  # honour camera orientation (no-op when no EXIF tag)
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float32)
        scale = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        g = np.clip(arr / scale, 0, 1)
        return LoadedImage(np.repeat(g[..., None], 3, axis=2), None, "L", 16 if scale > 255 else 8,
                           im.format or "", icc_profile=icc, notes=notes)
    if im.mode == "F":
        g = np.clip(np.asarray(im, dtype=np.float32), 0, 1)
        return LoadedImage(np.repeat(g[..., None], 3, axis=2), None, "L", 16, im.format or "",
                           icc_profile=icc, notes=notes)
    if im.mode == "P" or im.mode == "PA":
        im = im.convert("RGBA" if ("transparency" in im.info or im.mode == "PA") else "RGB")
    if im.mode == "1":
        im = im.convert("L")
    if im.mode == "CMYK":
        im = im.convert("RGB")
        icc = None  # the CMYK profile no longer describes the pixels
        notes.append("CMYK converted to RGB")
    if im.mode in ("L", "LA"):
        arr = np.asarray(im, dtype=np.float32) / 255.0
        g = arr if im.mode == "L" else arr[..., 0]
        alpha = arr[..., 1] if im.mode == "LA" else None
        return LoadedImage(np.repeat(g[..., None], 3, axis=2), alpha, "L", 8, im.format or "",
                           icc_profile=icc, notes=notes)
    if im.mode not in ("RGB", "RGBA"):
        im = im.convert("RGBA" if "A" in im.mode else "RGB")
    arr = np.asarray(im, dtype=np.float32) / 255.0
    alpha = arr[..., 3] if im.mode == "RGBA" else None
    if alpha is not None and alpha.min() >= 1.0:
        alpha = None  # an all-opaque alpha channel carries nothing; keep the fast path
        notes.append("alpha channel fully opaque: dropped")
    return LoadedImage(np.ascontiguousarray(arr[..., :3]), alpha, "RGB", 8, im.format or "",
                       icc_profile=icc, notes=notes)


def to_float(arr: np.ndarray) -> np.ndarray:
    """uint8/uint16 or float → float32 in [0, 1]."""
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype == np.uint16:
        return arr.astype(np.float32) / 65535.0
    return arr.astype(np.float32, copy=False)


def to_uint(arr: np.ndarray, bit_depth: int = 8) -> np.ndarray:
    """Float [0,1] (or uint8/uint16) → uint8/uint16, rounded."""
    want = np.uint16 if bit_depth == 16 else np.uint8
    if arr.dtype == want:
        return arr
    top = 65535 if bit_depth == 16 else 255
    out = np.clip(to_float(arr), 0, 1) * top + 0.5
    return out.astype(want)


def _gray(rgb: np.ndarray) -> np.ndarray:
    """Mean of the three channels, keeping the dtype (the pipeline keeps grey images as R=G=B)."""
    if rgb.ndim == 2:
        return rgb
    if rgb.dtype.kind == "u":
        return (rgb.astype(np.uint32).sum(axis=2) // 3).astype(rgb.dtype)
    return rgb.mean(axis=2)


def to_pil(rgb: np.ndarray, alpha: np.ndarray | None = None, mode: str = "RGB") -> Image.Image:
    """An 8-bit PIL image for display or saving (grey when mode is "L")."""
    rgb8 = to_uint(_gray(rgb) if mode == "L" else rgb)
    if alpha is not None:
        a8 = to_uint(alpha)
        if mode == "L":
            return Image.fromarray(np.dstack([rgb8, a8]), "LA")
        return Image.fromarray(np.dstack([rgb8, a8]), "RGBA")
    return Image.fromarray(rgb8, "L" if mode == "L" else "RGB")


def _new_temp(path: str | os.PathLike, create) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.part"
        try:
            create(tmp)
            return tmp
        except FileExistsError:  # a name another writer just took
            continue


def new_temp_file(path: str | os.PathLike) -> Path:
    """A new empty file next to `path` (same filesystem, so os.replace over `path` is atomic).

    It is created with mode 0666 and the kernel applies the user's umask, so the renamed output
    gets the mode `cp` would give it; mkstemp's owner-only 0600 would survive the rename."""
    return _new_temp(path, lambda tmp: os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)))


def new_temp_dir(path: str | os.PathLike) -> Path:
    """A new empty folder next to `path`, with the usual mode for the umask (mkdtemp's is 0700)."""
    return _new_temp(path, os.mkdir)


def atomic_write(path: str | os.PathLike, write) -> None:
    """`write(f)` into a temporary file next to `path`, synced, then renamed over it: readers see the
    old file or the whole new one, and an interrupted write leaves no partial file."""
    path = Path(path)
    tmp = new_temp_file(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def encode_image(rgb: np.ndarray, alpha: np.ndarray | None = None, **kw) -> bytes:
    """Encode to bytes in the format of `ext` (keywords as encode_image_to)."""
    buf = io.BytesIO()
    encode_image_to(buf, rgb, alpha, **kw)
    return buf.getvalue()


def encode_image_to(
    buf,
    rgb: np.ndarray,
    alpha: np.ndarray | None = None,
    *,
    mode: str = "RGB",
    bit_depth: int = 8,
    ext: str = "png",
    icc_profile: bytes | None = None,
    quality: int = 95,
) -> None:
    """Encode into the binary file `buf` in the format of `ext`. 16-bit output is PNG only (as in
    Real-ESRGAN)."""
    ext = ext.lower().lstrip(".")
    if ext == "jpeg":
        ext = "jpg"
    if bit_depth == 16 and ext == "png":
        h, w = rgb.shape[:2]

        def rows():  # converted and interleaved a few rows at a time: a 16384² RGBA is 2 GB whole
            for r in range(0, h, 64):
                part = rgb[r:r + 64]
                base = to_uint(_gray(part), 16)[..., None] if mode == "L" else to_uint(part, 16)
                arr = np.dstack([base, to_uint(alpha[r:r + 64], 16)]) if alpha is not None else base
                yield from arr.reshape(arr.shape[0], -1)

        png.Writer(w, h, greyscale=mode == "L", alpha=alpha is not None, bitdepth=16,
                   compression=PNG_COMPRESS_LEVEL).write(buf, rows())
        return
    im = to_pil(rgb, alpha, mode)
    kwargs = {"icc_profile": icc_profile} if icc_profile else {}
    if ext == "jpg":
        if im.mode in ("RGBA", "LA"):
            raise ValueError("JPEG cannot store alpha: write PNG or WebP")
        im.save(buf, "JPEG", quality=quality, **kwargs)
    elif ext == "webp":
        im.save(buf, "WEBP", quality=quality, **kwargs)
    elif ext == "png":
        im.save(buf, "PNG", compress_level=PNG_COMPRESS_LEVEL, **kwargs)
    else:
        raise ValueError(f"unsupported output extension {ext!r} (use png, jpg or webp)")


def write_image(path: str | os.PathLike, rgb: np.ndarray, alpha: np.ndarray | None = None, **kw) -> None:
    """Encode and write atomically; the format follows the path's extension."""
    path = Path(path)
    # Straight into the temporary file: an 8192² PNG is never held in memory as bytes as well.
    atomic_write(path, lambda f: encode_image_to(f, rgb, alpha, ext=path.suffix or "png", **kw))


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files directly in `folder`, sorted by name (hidden and temp files skipped)."""
    folder = Path(folder)
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def batch_images(batch, what: str) -> list[np.ndarray]:
    """An N x C x H x W (C = 1 or 3) tensor or array in [0, 1] as N HxWxC arrays, for metrics that
    take one image at a time (niqe, piqe); `what` names the metric in the one-line error."""
    if hasattr(batch, "detach"):
        batch = batch.detach().cpu().float().numpy()
    arr = np.asarray(batch)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[1] not in (1, 3):
        raise ValueError(f"{what} takes N x C x H x W with C = 1 or 3, got shape {arr.shape}")
    return [np.moveaxis(a, 0, -1) for a in arr]
