"""The map between a scan's own voxel grid and the (Z, S, S) slice stack the network sees, both ways.

Forward (:func:`resample_to_slices`): reorient the volume to the canonical orientation, put the
axial axis first, then resize (or centre crop/pad) every axial plane to ``size x size``; the
``"spacing"`` mode first resamples every plane to a fixed pixel spacing in mm, then centre
crops/pads it, so a scan with a larger field of view shows its anatomy at the same scale.
Backward (:func:`restore_volume`): undo the in-plane step, then the reorientation, so a predicted
mask lands on the original voxel grid and overlays the original scan under its original affine.

Canonical orientation is ``("P", "L", "S")`` (nibabel axis codes: array axis 0 runs towards
posterior, axis 1 towards the patient's left, axis 2 towards superior). Then ``volume[:, :, z]``
is an axial slice already in the radiological display convention (anterior at the top, patient's
right on the image's left), so sample images, previews and overlays look like a CT viewer's, and
slice ``z + 1`` lies above slice ``z``. Any voxel order on disk (LiTS files come in several)
reaches the same canonical array; oblique affines go to the closest canonical axes
(``nibabel.orientations.io_orientation``), so no voxel is ever resampled across slices.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

CANONICAL_AXCODES = ("P", "L", "S")
RESIZE_MODES = ("resize", "crop", "spacing")
INTERPOLATIONS = ("linear", "nearest")
CHUNK_SLICES = 8
"""Slices resampled at a time: small enough for the CPU cache (a whole 512 x 512 x 100 float32
volume is 100 MB), large enough for few calls."""


@dataclass(frozen=True)
class VolumeGeometry:
    """Everything needed to go from a scan's voxel grid to its slice stack and back.

    Attributes:
        original_shape: (X, Y, Z) voxels of the array as stored on disk.
        original_affine: 4x4 voxel-to-world (RAS mm) matrix of the file, row by row.
        orientation: nibabel orientation transform (3 rows of (target axis, flip +1/-1)) taking
            the original array to the canonical ``("P", "L", "S")`` array.
        canonical_shape: (H, W, Z) of the reoriented array; Z is the number of axial slices.
        size: S, the side of every output plane.
        resize_mode: ``"resize"`` (planes scaled from H x W to S x S), ``"crop"`` (planes
            centre-cropped or zero-padded to S x S, no scaling) or ``"spacing"`` (planes scaled
            to ``scaled_shape``, i.e. to a fixed pixel spacing in mm, then centre-cropped/padded).
        offsets: crop and spacing modes, (row, column) position of the (scaled) canonical plane's
            pixel (0, 0) inside the S x S plane; negative means cropped, positive means padded.
            (0, 0) for resize.
        scaled_shape: spacing mode only, (rows, columns) of a canonical plane resampled to the
            target spacing; (0, 0) otherwise.
    """

    original_shape: tuple[int, int, int]
    original_affine: tuple[tuple[float, ...], ...]
    orientation: tuple[tuple[int, int], ...]
    canonical_shape: tuple[int, int, int]
    size: int
    resize_mode: str
    offsets: tuple[int, int] = (0, 0)
    scaled_shape: tuple[int, int] = (0, 0)

    @property
    def affine(self) -> np.ndarray:
        """The original affine as a (4, 4) float64 array."""
        return np.array(self.original_affine, dtype=np.float64)

    @property
    def axial_is_file_z(self) -> bool:
        """True when the file's third voxel axis is the axial one, so slabs along it can be reoriented alone."""
        return self.orientation[2][0] == 2

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel sizes in mm along the original (X, Y, Z) axes."""
        return tuple(float(v) for v in nib.affines.voxel_sizes(self.affine))

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (lists and plain numbers); :meth:`from_dict` inverts it exactly."""
        return {key: _listify(value) for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> VolumeGeometry:
        """Rebuild from :meth:`to_dict` output (e.g. read back from ``cases.json``).

        Raises:
            ValueError: a key is missing or has the wrong shape.
        """
        try:
            return cls(
                original_shape=tuple(int(v) for v in payload["original_shape"]),
                original_affine=tuple(tuple(float(v) for v in row) for row in payload["original_affine"]),
                orientation=tuple((int(axis), int(flip)) for axis, flip in payload["orientation"]),
                canonical_shape=tuple(int(v) for v in payload["canonical_shape"]),
                size=int(payload["size"]),
                resize_mode=str(payload["resize_mode"]),
                offsets=tuple(int(v) for v in payload["offsets"]),
                scaled_shape=tuple(int(v) for v in payload.get("scaled_shape", (0, 0))),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"not a VolumeGeometry dict ({err!r}): {payload!r}") from err


def _listify(value: Any) -> Any:
    return [_listify(v) for v in value] if isinstance(value, (tuple, list)) else value


def volume_geometry(
    shape: tuple[int, ...], affine: np.ndarray, size: int, resize_mode: str, spacing_mm: float = 1.0
) -> VolumeGeometry:
    """Plan the forward and backward transforms of one volume.

    Args:
        shape: (X, Y, Z) of the stored array.
        affine: (4, 4) voxel-to-world matrix of the file.
        size: S, side of the output planes.
        resize_mode: ``"resize"``, ``"crop"`` or ``"spacing"``.
        spacing_mm: spacing mode only, the in-plane pixel spacing of the output planes in mm.

    Returns:
        The :class:`VolumeGeometry`.

    Raises:
        ValueError: shape not 3-D, affine not 4x4 or singular, unknown ``resize_mode``, size < 1.
    """
    affine = np.asarray(affine, dtype=np.float64)
    if len(shape) != 3:
        raise ValueError(f"expected a 3-D volume (X, Y, Z), got shape {tuple(shape)}")
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ValueError(f"expected a finite, invertible 4x4 affine, got {affine.tolist()}")
    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"resize_mode {resize_mode!r} is not one of {RESIZE_MODES}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    orientation = ornt_transform(io_orientation(affine), axcodes2ornt(CANONICAL_AXCODES)).astype(int)
    canonical_shape = [0, 0, 0]
    for source_axis, (target_axis, _) in enumerate(orientation):
        canonical_shape[target_axis] = int(shape[source_axis])
    offsets, scaled_shape = (0, 0), (0, 0)
    if resize_mode == "spacing":
        if not spacing_mm > 0:
            raise ValueError(f"spacing_mm must be > 0, got {spacing_mm}")
        voxel_mm = nib.affines.voxel_sizes(affine)
        scaled_shape = [0, 0]
        for source_axis, (target_axis, _) in enumerate(orientation):
            if target_axis < 2:
                scaled_shape[target_axis] = max(1, round(shape[source_axis] * voxel_mm[source_axis] / spacing_mm))
        scaled_shape = tuple(scaled_shape)
    if resize_mode in ("crop", "spacing"):
        plane = scaled_shape if resize_mode == "spacing" else canonical_shape
        offsets = ((size - plane[0]) // 2, (size - plane[1]) // 2)
    return VolumeGeometry(
        original_shape=tuple(int(v) for v in shape),
        original_affine=tuple(tuple(float(v) for v in row) for row in affine),
        orientation=tuple((int(axis), int(flip)) for axis, flip in orientation),
        canonical_shape=tuple(canonical_shape),
        size=int(size),
        resize_mode=resize_mode,
        offsets=offsets,
        scaled_shape=scaled_shape,
    )


def resample_to_slices(volume: np.ndarray, geometry: VolumeGeometry, interpolation: str) -> np.ndarray:
    """Original voxel grid -> canonical axial planes of side S.

    Args:
        volume: (X, Y, Z) array with ``geometry.original_shape``.
        geometry: from :func:`volume_geometry`.
        interpolation: ``"linear"`` (bilinear, for images; returns float32) or ``"nearest"``
            (for masks; keeps the dtype). Ignored in crop mode (no scaling; dtype kept).

    Returns:
        (Z, S, S) array, C-contiguous.

    Raises:
        ValueError: wrong shape or unknown interpolation.
    """
    if tuple(volume.shape) != geometry.original_shape:
        raise ValueError(f"volume shape {tuple(volume.shape)} does not match the geometry's {geometry.original_shape}")
    _, planes = canonical_slab(volume, 0, geometry)
    return np.concatenate([resample_planes(chunk, geometry, interpolation) for _, chunk in chunks(planes)])


def canonical_slab(slab: np.ndarray, start: int, geometry: VolumeGeometry) -> tuple[int, np.ndarray]:
    """The canonical axial planes of the file slab ``volume[:, :, start:start + n]``, as a view.

    Any slab works when the file's third axis is the axial one (:attr:`VolumeGeometry.axial_is_file_z`,
    true of LiTS and MSD); otherwise only the whole volume does.

    Returns:
        ``(first, planes)``: planes (n, H, W) are canonical slices ``first .. first + n - 1``
        (a file stored from head to feet fills the canonical stack from the top down).

    Raises:
        ValueError: a partial slab of a volume whose third axis is not axial.
    """
    depth = geometry.original_shape[2]
    whole = start == 0 and slab.shape[2] == depth
    if not (whole or geometry.axial_is_file_z):
        raise ValueError("the file's third axis is not the axial axis: only the whole volume can be reoriented")
    planes = np.moveaxis(apply_orientation(slab, np.array(geometry.orientation)), -1, 0)
    flipped = geometry.orientation[2][1] < 0
    return (depth - start - slab.shape[2] if flipped and not whole else start), planes


def chunks(planes: np.ndarray, size: int = CHUNK_SLICES) -> Iterator[tuple[int, np.ndarray]]:
    """``(offset, planes[offset:offset + size])`` over the first axis."""
    for offset in range(0, len(planes), size):
        yield offset, planes[offset : offset + size]


def resample_planes(planes: np.ndarray, geometry: VolumeGeometry, interpolation: str) -> np.ndarray:
    """The in-plane step: canonical (n, H, W) planes -> (n, S, S), resized or centre cropped/padded.

    Args:
        planes: canonical planes, e.g. a chunk from :func:`canonical_slab`.
        geometry: the volume's geometry.
        interpolation: ``"linear"`` (returns float32) or ``"nearest"`` (keeps the dtype); ignored
            in crop mode.
    """
    _check_interpolation(interpolation)
    side = (geometry.size, geometry.size)
    if geometry.resize_mode == "crop":
        return _place(planes, side, geometry.offsets)
    if geometry.resize_mode == "spacing":
        return _place(_resize(planes, geometry.scaled_shape, interpolation), side, geometry.offsets)
    return _resize(planes, side, interpolation)


def restore_volume(slices: np.ndarray, geometry: VolumeGeometry, interpolation: str = "linear") -> np.ndarray:
    """Canonical planes of side S -> the original voxel grid (inverse of :func:`resample_to_slices`).

    Use ``"linear"`` for probabilities (threshold afterwards) and ``"nearest"`` for label masks.
    In crop and spacing modes the voxels that were cropped away come back as 0.

    Args:
        slices: (Z, S, S) array, e.g. predicted probabilities or a binary mask.
        geometry: the volume's :class:`VolumeGeometry` (``VolumeGeometry.from_dict`` of
            ``cases.json``'s entry, or the one :func:`prepare_volume` returned).
        interpolation: ``"linear"`` (returns float32) or ``"nearest"`` (keeps the dtype).
            Ignored in crop mode (no scaling; dtype kept).

    Returns:
        (X, Y, Z) array with ``geometry.original_shape``, in the voxel order of the original file,
        so ``nib.Nifti1Image(result, geometry.affine)`` overlays the original scan. It is a
        (usually Fortran-ordered) view that may share memory with ``slices``.

    Raises:
        ValueError: ``slices`` is not (Z, S, S) for this geometry, or unknown interpolation.
    """
    _check_interpolation(interpolation)
    height, width, depth = geometry.canonical_shape
    expected = (depth, geometry.size, geometry.size)
    if tuple(slices.shape) != expected:
        raise ValueError(f"slices have shape {tuple(slices.shape)}, expected {expected} for this volume")
    if geometry.resize_mode == "crop":
        offsets = (-geometry.offsets[0], -geometry.offsets[1])
        planes = _place(np.asarray(slices), (height, width), offsets)
    elif geometry.resize_mode == "spacing":
        offsets = (-geometry.offsets[0], -geometry.offsets[1])
        planes = _resize(_place(np.asarray(slices), geometry.scaled_shape, offsets), (height, width), interpolation)
    else:
        planes = _resize(np.asarray(slices), (height, width), interpolation)
    canonical = np.moveaxis(planes, 0, -1)
    # A view, not a C-ordered copy: for a file whose third axis is axial it is Fortran-ordered, NIfTI's
    # own voxel order, so thresholding and writing it stay sequential; a C copy of 512 x 512 x 200
    # voxels (a cache-hostile transpose) took longer than the network of the default model.
    restored = apply_orientation(canonical, _inverse_orientation(geometry.orientation))
    assert restored.shape == geometry.original_shape, (restored.shape, geometry.original_shape)
    return restored


def _inverse_orientation(orientation: tuple[tuple[int, int], ...]) -> np.ndarray:
    """The transform undoing ``orientation``: canonical axis ``target`` goes back to ``source``."""
    inverse = np.zeros((len(orientation), 2), dtype=int)
    for source_axis, (target_axis, flip) in enumerate(orientation):
        inverse[target_axis] = (source_axis, flip)
    return inverse


def _check_interpolation(interpolation: str) -> None:
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation {interpolation!r} is not one of {INTERPOLATIONS}")


def _resize(planes: np.ndarray, side: tuple[int, int], interpolation: str) -> np.ndarray:
    """(Z, h, w) -> (Z, H, W) C-contiguous: bilinear (half-pixel centres, as image libraries) or nearest-exact."""
    if planes.shape[1:] == side:
        return np.ascontiguousarray(planes, dtype=np.float32 if interpolation == "linear" else planes.dtype)
    if interpolation == "nearest":
        rows = _nearest_index(planes.shape[1], side[0])
        cols = _nearest_index(planes.shape[2], side[1])
        return np.take(np.take(planes, rows, axis=1), cols, axis=2)  # 5x faster than one 2-D gather
    tensor = torch.from_numpy(np.ascontiguousarray(planes, dtype=np.float32))[:, None]
    return F.interpolate(tensor, size=side, mode="bilinear", align_corners=False)[:, 0].numpy()


def _nearest_index(source: int, target: int) -> np.ndarray:
    """Source index whose pixel centre is nearest to each target pixel centre (torch's nearest-exact)."""
    return np.minimum(((np.arange(target) + 0.5) * (source / target)).astype(np.int64), source - 1)


def _place(planes: np.ndarray, side: tuple[int, int], offsets: tuple[int, int]) -> np.ndarray:
    """Centre crop/pad: ``out[:, r + dr, c + dc] = planes[:, r, c]`` where inside, zero elsewhere."""
    out = np.zeros((planes.shape[0], *side), dtype=planes.dtype)
    source, target = [slice(None)], [slice(None)]
    for axis, offset in enumerate(offsets):
        source_start, target_start = max(0, -offset), max(0, offset)
        length = max(0, min(planes.shape[axis + 1] - source_start, side[axis] - target_start))
        source.append(slice(source_start, source_start + length))
        target.append(slice(target_start, target_start + length))
    out[tuple(target)] = planes[tuple(source)]
    return out
