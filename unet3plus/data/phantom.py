"""Synthetic abdominal CT phantom written in the exact LiTS or MSD Task09_Spleen file layout.

Each case is a seeded, randomly deformed abdomen in Hounsfield units: body outline with
subcutaneous fat and a muscle wall, spine with discs and ribs, lung bases above a domed
diaphragm, aorta and inferior vena cava, kidneys, psoas, stomach and bowel loops with gas, a
lobed liver with portal vessels, hypodense tumours and a gallbladder, and a crescent spleen.
Organs occupy only part of the scan length, so many slices hold no organ at all.

Coordinates: anatomy is drawn in units of half the field of view (``lr`` +1 = patient left,
``ap`` +1 = anterior) and fractions of the scan length (``si`` 0 = inferior end, 1 = superior).
Arrays are built in DICOM-like storage order (index i towards patient left, j towards posterior,
k towards head), which is what the usual affine ``diag(-dx, -dy, dz)`` describes. In-plane spacing
is that of a 307-461 mm field of view (0.6-0.9 mm at 512 pixels; proportionally coarser for
smaller ``size``); slices are 0.7-5 mm thick. About one LiTS case in four is stored with the
antero-posterior axis flipped (positive ``y`` in the affine), as some real LiTS volumes are.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from tqdm import tqdm

from unet3plus.config import DATASET_OF_LAYOUT
from unet3plus.data.sources import SYNTH_MARKER as MARKER
from unet3plus.data.sources import check_layout, discover_cases, organ_mask, read_volume
from unet3plus.errors import ConfigError, DataError
from unet3plus.utils import atomic_path, check_replaceable, record_outputs, staged_dir

logger = logging.getLogger(__name__)

LITS_TEST_IDS = range(28)  # the paper's test cases ("training batch 1")
LITS_TRAIN_IDS = range(28, 131)


class Tissue(IntEnum):
    """Tissue classes painted into the phantom; each has its own per-case HU mean."""

    AIR = 0
    TABLE = 1
    FAT = 2
    MUSCLE = 3
    VISCERAL_FAT = 4
    LUNG = 5
    RIB = 6
    CORTICAL_BONE = 7
    CANCELLOUS_BONE = 8
    DISC = 9
    CSF = 10
    AORTA = 11
    VENA_CAVA = 12
    KIDNEY = 13
    URINE = 14
    BOWEL = 15
    GAS = 16
    STOMACH_WALL = 17
    FLUID = 18
    SPLEEN = 19
    LIVER = 20
    LIVER_VESSEL = 21
    TUMOUR = 22
    HEART = 23


# (low, high) of each tissue's mean HU; one value is drawn per case (portal-venous contrast CT).
TISSUE_HU: dict[Tissue, tuple[float, float]] = {
    Tissue.AIR: (-1000, -995),
    Tissue.TABLE: (150, 250),
    Tissue.FAT: (-115, -90),
    Tissue.MUSCLE: (30, 45),
    Tissue.VISCERAL_FAT: (-105, -80),
    Tissue.LUNG: (-880, -820),
    Tissue.RIB: (450, 750),
    Tissue.CORTICAL_BONE: (700, 1000),
    Tissue.CANCELLOUS_BONE: (180, 300),
    Tissue.DISC: (70, 100),
    Tissue.CSF: (5, 20),
    Tissue.AORTA: (170, 230),
    Tissue.VENA_CAVA: (120, 160),
    Tissue.KIDNEY: (150, 190),
    Tissue.URINE: (5, 25),
    Tissue.BOWEL: (20, 40),
    Tissue.GAS: (-990, -960),
    Tissue.STOMACH_WALL: (35, 50),
    Tissue.FLUID: (0, 15),
    Tissue.SPLEEN: (52, 64),
    Tissue.LIVER: (58, 72),
    Tissue.LIVER_VESSEL: (110, 140),
    Tissue.TUMOUR: (20, 40),
    Tissue.HEART: (80, 130),  # myocardium and enhanced blood, averaged
}

# Soft tissues an organ may displace when painted; bones, vessels and other organs stay.
DISPLACEABLE = (Tissue.VISCERAL_FAT, Tissue.BOWEL, Tissue.GAS)

WINDOW_HU = (-160.0, 240.0)  # abdominal soft-tissue window (level 40, width 400) for previews


class _Canvas:
    """A tissue volume plus its anatomical coordinate axes; paints masks inside bounding boxes."""

    def __init__(self, size: int, slices: int) -> None:
        centres = ((np.arange(size) + 0.5) / size * 2 - 1).astype(np.float32)
        self.lr = centres  # index i: patient right -> left
        self.ap = -centres  # index j: anterior -> posterior
        self.si = ((np.arange(slices) + 0.5) / slices).astype(np.float32)  # index k: feet -> head
        self.tissue = np.zeros((size, size, slices), np.uint8)

    def box(self, lr: tuple[float, float], ap: tuple[float, float], si: tuple[float, float]) -> tuple[slice, ...]:
        """Index slices covering the coordinate ranges (empty slices when outside the volume)."""
        return tuple(
            _index_range(axis, low, high) for axis, (low, high) in zip((self.lr, self.ap, self.si), (lr, ap, si))
        )

    def grids(self, box: tuple[slice, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable coordinates of ``box``: lr (I,1,1), ap (1,J,1), si (1,1,K)."""
        return self.lr[box[0], None, None], self.ap[None, box[1], None], self.si[None, None, box[2]]

    def ellipse(self, centre_lr: float, centre_ap: float, radius_lr: float, radius_ap: float) -> np.ndarray:
        """(X, Y) bool: an axial ellipse."""
        return ((self.lr[:, None] - centre_lr) / radius_lr) ** 2 + (
            (self.ap[None, :] - centre_ap) / radius_ap
        ) ** 2 <= 1

    def paint(
        self, box: tuple[slice, ...], mask: np.ndarray, tissue: Tissue, over: tuple[Tissue, ...] | None = None
    ) -> None:
        """Set ``tissue`` where ``mask`` (broadcastable to the box) holds, optionally only over ``over``."""
        region = self.tissue[box]
        mask = np.broadcast_to(mask, region.shape)
        if over is None:
            region[mask] = tissue
            return
        replaceable = np.zeros(len(Tissue), bool)
        replaceable[list(over)] = True
        values = region[mask]
        region[mask] = np.where(replaceable[values], np.uint8(tissue), values)

    def paint_extruded(
        self, mask: np.ndarray, tissue: Tissue, along: np.ndarray | None = None, over: tuple[Tissue, ...] | None = None
    ) -> None:
        """Paint an axial mask (X, Y) in every slice, or only where the per-slice gate ``along`` (Z,) holds."""
        rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        if rows.size == 0:
            return
        box = (slice(rows[0], rows[-1] + 1), slice(columns[0], columns[-1] + 1), slice(None))
        gate = np.ones(self.si.shape, bool) if along is None else along
        self.paint(box, mask[box[0], box[1], None] & gate, tissue, over)


def _index_range(axis: np.ndarray, low: float, high: float) -> slice:
    inside = np.flatnonzero((axis >= low) & (axis <= high))
    return slice(inside[0], inside[-1] + 1) if inside.size else slice(0, 0)


def _blob(
    canvas: _Canvas,
    rng: np.random.Generator,
    centre: tuple[float, float, float],
    radii: tuple[float, float, float],
    angle: float = 0.0,
    warp: float = 0.15,
) -> tuple[tuple[slice, ...], np.ndarray]:
    """A smoothly deformed ellipsoid: its bounding box and boolean mask inside that box.

    The surface radius is modulated by ``1 + warp * f`` with ``f`` a sum of three random
    low-frequency sinusoids (|f| <= 1), so every case gets a different, smooth shape.
    ``angle`` rotates the ellipsoid in the axial plane (radians, counter-clockwise from ``lr``).
    """
    reach = max(radii[0], radii[1]) * (1 + warp)
    box = canvas.box(
        (centre[0] - reach, centre[0] + reach),
        (centre[1] - reach, centre[1] + reach),
        (centre[2] - radii[2] * (1 + warp), centre[2] + radii[2] * (1 + warp)),
    )
    lr, ap, si = canvas.grids(box)
    cos, sin = np.cos(angle), np.sin(angle)
    x = ((lr - centre[0]) * cos + (ap - centre[1]) * sin) / radii[0]
    y = (-(lr - centre[0]) * sin + (ap - centre[1]) * cos) / radii[1]
    z = (si - centre[2]) / radii[2]
    field = np.zeros(np.broadcast_shapes(x.shape, y.shape, z.shape), np.float32)
    for _ in range(3):
        direction = rng.normal(size=3)
        direction *= rng.uniform(1.5, 3.0) / np.linalg.norm(direction)
        field += np.sin(direction[0] * x + direction[1] * y + direction[2] * z + rng.uniform(0, 2 * np.pi)) / 3
    return box, x * x + y * y + z * z <= (1 + warp * field) ** 2


def _segment_tube(
    canvas: _Canvas, start: np.ndarray, end: np.ndarray, radius: float, si_to_units: float
) -> tuple[tuple[slice, ...], np.ndarray]:
    """A cylinder of ``radius`` around the segment start-end ((lr, ap, si) points): box and mask."""
    low, high = np.minimum(start, end), np.maximum(start, end)
    margin = np.array([radius, radius, radius / si_to_units])
    box = canvas.box(*zip(low - margin, high + margin))
    lr, ap, si = canvas.grids(box)
    direction = (end - start) * np.array([1, 1, si_to_units])
    length2 = float(direction @ direction)
    offsets = (lr - start[0], ap - start[1], (si - start[2]) * si_to_units)
    t = np.clip(sum(o * d for o, d in zip(offsets, direction)) / length2, 0, 1)
    distance2 = sum((o - t * d) ** 2 for o, d in zip(offsets, direction))
    return box, distance2 <= radius**2


@dataclass
class _Body:
    """Per-case landmarks shared by the organ painters (in-plane units and scan fractions).

    ``radius``, ``muscle_radius`` and ``cavity_radius`` (X, Y) are normalised distances whose level
    ``scale`` (Z,) marks the skin, the inner edge of the fat and the inner edge of the muscle wall.
    """

    si_to_units: float
    centre_lr: float
    centre_ap: float
    half_width: float
    front: float
    back: float
    theta: np.ndarray
    radius: np.ndarray
    muscle_radius: np.ndarray
    cavity_radius: np.ndarray
    scale: np.ndarray
    spine_lr: float
    canal_ap: float
    vertebra_ap: float
    aorta_ap: float
    dome_right: float
    dome_left: float
    dome: np.ndarray  # (X, Y, 1) scan fraction of the diaphragm; lung above, abdomen below

    @property
    def back_edge(self) -> float:
        """Antero-posterior position of the skin of the back."""
        return self.centre_ap - self.back

    @property
    def cavity(self) -> np.ndarray:
        """(X, Y, Z) bool: inside the abdominal muscle wall."""
        return self.cavity_radius[:, :, None] <= self.scale


def _plan_body(canvas: _Canvas, rng: np.random.Generator, si_to_units: float) -> _Body:
    """Draw the landmarks of one case: body outline, wall thickness, spine, aorta and diaphragm."""
    # A superellipse, flatter at the back, with a few angular harmonics; fat and muscle wall are
    # thicker in front; the outline breathes slowly along the scan.
    centre_lr, centre_ap = rng.uniform(-0.03, 0.03), rng.uniform(-0.06, 0.02)
    half_width, front, back = rng.uniform(0.78, 0.9), rng.uniform(0.52, 0.64), rng.uniform(0.46, 0.54)
    x, y = canvas.lr[:, None] - centre_lr, canvas.ap[None, :] - centre_ap
    theta = np.arctan2(y, x)
    power = rng.uniform(2.0, 2.6)
    radius = (np.abs(x / half_width) ** power + np.abs(y / np.where(y > 0, front, back)) ** power) ** (1 / power)
    radius /= 1 + sum(rng.uniform(0.01, 0.03) * np.cos(m * theta + rng.uniform(0, 2 * np.pi)) for m in (2, 3, 4))
    anterior = np.clip(np.sin(theta), 0, 1)
    muscle_radius = radius / (1 - rng.uniform(0.04, 0.11) * (0.5 + 0.8 * anterior))
    cavity_radius = muscle_radius / (1 - rng.uniform(0.05, 0.09) * (0.5 + 0.8 * anterior))
    breathing = 2 * np.pi * rng.uniform(0.5, 1.5) * canvas.si + rng.uniform(0, 2 * np.pi)
    scale = 1 + rng.uniform(0.02, 0.05) * np.sin(breathing)
    vertebra_ap = centre_ap - back + rng.uniform(0.3, 0.34)
    dome_right = rng.uniform(0.82, 0.93)
    dome_left = dome_right - rng.uniform(0.02, 0.06)
    curvature = rng.uniform(0.25, 0.4)
    lr2, ap2 = canvas.lr[:, None], canvas.ap[None, :]
    dome = np.maximum(
        dome_right - curvature * ((lr2 + 0.45 * half_width) ** 2 + 0.6 * ap2**2),
        dome_left - curvature * ((lr2 - 0.45 * half_width) ** 2 + 0.6 * ap2**2),
    )
    return _Body(
        si_to_units=si_to_units,
        centre_lr=centre_lr,
        centre_ap=centre_ap,
        half_width=half_width,
        front=front,
        back=back,
        theta=theta,
        radius=radius,
        muscle_radius=muscle_radius,
        cavity_radius=cavity_radius,
        scale=scale,
        spine_lr=centre_lr + rng.uniform(-0.02, 0.02),
        canal_ap=centre_ap - back + rng.uniform(0.18, 0.22),
        vertebra_ap=vertebra_ap,
        aorta_ap=vertebra_ap + rng.uniform(0.14, 0.17),
        dome_right=dome_right,
        dome_left=dome_left,
        dome=dome[:, :, None],
    )


def _paint_body_wall(canvas: _Canvas, rng: np.random.Generator, body: _Body) -> None:
    """Skin to cavity: subcutaneous fat, muscle wall, visceral fat inside; the table below."""
    layers = sum(
        (r[:, :, None] <= body.scale).astype(np.uint8) for r in (body.radius, body.muscle_radius, body.cavity_radius)
    )
    canvas.tissue[:] = np.array([Tissue.AIR, Tissue.FAT, Tissue.MUSCLE, Tissue.VISCERAL_FAT], np.uint8)[layers]
    lr2, ap2 = canvas.lr[:, None], canvas.ap[None, :]
    curve = body.back_edge + 0.06 * lr2**2
    canvas.paint_extruded((ap2 < curve - 0.03) & (ap2 > curve - 0.06) & (np.abs(lr2) < 0.85), Tissue.TABLE)


def _paint_spine(canvas: _Canvas, rng: np.random.Generator, body: _Body) -> None:
    """Paraspinal muscles; vertebral bodies (cortex, marrow) between discs; canal; posterior arch."""
    level = canvas.si * body.si_to_units / rng.uniform(0.16, 0.2) + rng.uniform(0, 1)  # levels ~30 mm apart
    phase = level - np.floor(level)
    disc, arch = phase < 0.22, (phase > 0.3) & (phase < 0.8)
    lr, canal = body.spine_lr, body.canal_ap
    for side in (-1, 1):
        canvas.paint_extruded(canvas.ellipse(lr + side * 0.15, canal - 0.05, 0.12, 0.11), Tissue.MUSCLE)
    vertebra = canvas.ellipse(lr, body.vertebra_ap, 0.11, 0.085)
    canvas.paint_extruded(vertebra, Tissue.DISC, disc)
    canvas.paint_extruded(vertebra, Tissue.CORTICAL_BONE, ~disc)
    canvas.paint_extruded(canvas.ellipse(lr, body.vertebra_ap, 0.095, 0.07), Tissue.CANCELLOUS_BONE, ~disc)
    lamina = canvas.ellipse(lr, canal, 0.07, 0.065) | canvas.ellipse(lr, canal - 0.07, 0.018, 0.06)
    processes = canvas.ellipse(lr, canal + 0.02, 0.13, 0.018)
    canvas.paint_extruded(lamina | processes, Tissue.CORTICAL_BONE, arch)
    canvas.paint_extruded(canvas.ellipse(lr, canal, 0.045, 0.04), Tissue.CSF)


def _paint_chest(canvas: _Canvas, rng: np.random.Generator, body: _Body) -> None:
    """Diaphragm, lung bases above it, the heart between them, ribs around the upper abdomen."""
    diaphragm = rng.uniform(0.01, 0.02) / body.si_to_units  # about 2-4 mm
    chest = canvas.box((-2, 2), (-2, 2), (float(body.dome.min() - diaphragm), 2))
    si, cavity = canvas.si[chest[2]], body.cavity[chest]
    muscle = cavity & (si > body.dome - diaphragm) & (si <= body.dome)
    canvas.paint(chest, muscle, Tissue.MUSCLE, over=(Tissue.VISCERAL_FAT,))
    canvas.paint(chest, cavity & (si > body.dome), Tissue.LUNG, over=(Tissue.VISCERAL_FAT,))
    heart_centre = (
        body.centre_lr + rng.uniform(0.05, 0.15),
        body.centre_ap + rng.uniform(0.1, 0.2),
        body.dome_right + rng.uniform(0.1, 0.15),
    )
    heart_radii = (rng.uniform(0.28, 0.34), rng.uniform(0.22, 0.28), rng.uniform(0.12, 0.16))
    heart = _blob(canvas, rng, heart_centre, heart_radii, rng.uniform(-0.6, -0.3), warp=0.08)
    canvas.paint(*heart, Tissue.HEART, over=(Tissue.LUNG,))
    # Ribs: short arcs in the wall whose angular positions drift along the scan, as oblique ribs do.
    wall = (body.cavity_radius >= 0.97) & (body.cavity_radius <= 1.02)
    wall &= (np.abs(body.theta - np.pi / 2) > 0.45) & (np.abs(body.theta + np.pi / 2) > 0.4)
    rib_cage = canvas.box((-2, 2), (-2, 2), (rng.uniform(0.45, 0.55), 2))
    rib_phase = 2 * np.pi * canvas.si[rib_cage[2]] * body.si_to_units / rng.uniform(0.12, 0.16)
    ribs = wall[:, :, None] & (np.cos(9 * body.theta[:, :, None] + rib_phase) > 0.7)
    canvas.paint(rib_cage, ribs, Tissue.RIB, over=(Tissue.MUSCLE, Tissue.VISCERAL_FAT, Tissue.FAT, Tissue.LUNG))


def _vena_cava(canvas: _Canvas, body: _Body) -> np.ndarray:
    return canvas.ellipse(body.spine_lr - 0.1, body.aorta_ap - 0.01, 0.07, 0.05)


def _paint_retroperitoneum(canvas: _Canvas, rng: np.random.Generator, body: _Body) -> None:
    """Aorta (splitting into iliac arteries low down), inferior vena cava, psoas muscles, kidneys."""
    bifurcation = rng.uniform(0.08, 0.2)
    aorta_radius = rng.uniform(0.055, 0.07)
    aorta = canvas.ellipse(body.spine_lr + 0.06, body.aorta_ap, aorta_radius, aorta_radius)
    canvas.paint_extruded(aorta, Tissue.AORTA, canvas.si >= bifurcation)
    below_dome = canvas.si < body.dome_right
    canvas.paint_extruded(_vena_cava(canvas, body), Tissue.VENA_CAVA, below_dome, over=(Tissue.VISCERAL_FAT,))
    for side in (-1, 1):
        iliac = canvas.ellipse(body.spine_lr + side * 0.12, body.aorta_ap, 0.04, 0.04)
        canvas.paint_extruded(iliac, Tissue.AORTA, canvas.si < bifurcation)
        psoas_lr = body.spine_lr + side * 0.14
        psoas_box = canvas.box(
            (psoas_lr - 0.09, psoas_lr + 0.09), (body.vertebra_ap - 0.09, body.vertebra_ap + 0.09), (-1, 0.45)
        )
        lr, ap, si = canvas.grids(psoas_box)
        psoas_radius = 0.085 * np.clip((0.45 - si) / 0.3, 0, 1)  # grows towards the pelvis
        psoas = (lr - psoas_lr) ** 2 + (ap - body.vertebra_ap) ** 2 <= psoas_radius**2
        canvas.paint(psoas_box, psoas, Tissue.MUSCLE, over=(Tissue.VISCERAL_FAT,))
        kidney_centre = (
            body.spine_lr + side * rng.uniform(0.3, 0.36),
            body.vertebra_ap + rng.uniform(-0.02, 0.03),
            rng.uniform(0.36, 0.46) - (side < 0) * 0.04,  # the right kidney sits lower
        )
        kidney_radii = (rng.uniform(0.08, 0.1), rng.uniform(0.12, 0.15), rng.uniform(0.12, 0.16))
        angle = side * rng.uniform(0.4, 0.7)
        canvas.paint(
            *_blob(canvas, rng, kidney_centre, kidney_radii, angle, warp=0.06), Tissue.KIDNEY, over=DISPLACEABLE
        )
        pelvis = (kidney_centre[0] - side * 0.05, kidney_centre[1] + 0.03, kidney_centre[2])
        canvas.paint(
            *_blob(canvas, rng, pelvis, (0.035, 0.05, 0.06), angle, warp=0.1), Tissue.URINE, over=(Tissue.KIDNEY,)
        )


def _paint_bowel_and_stomach(canvas: _Canvas, rng: np.random.Generator, body: _Body) -> None:
    """Bowel loops in the lower and anterior abdomen, many with gas floating on top; the stomach."""
    for _ in range(int(rng.integers(35, 55))):
        centre = (
            rng.uniform(-0.6, 0.6) * body.half_width,
            body.centre_ap + rng.uniform(-0.15, 0.45) * body.front,
            rng.uniform(0.0, 0.55),
        )
        radii = (rng.uniform(0.06, 0.13), rng.uniform(0.06, 0.11), rng.uniform(0.04, 0.1))
        box, loop = _blob(canvas, rng, centre, radii, rng.uniform(0, np.pi), warp=0.2)
        loop &= body.cavity[box]
        canvas.paint(box, loop, Tissue.BOWEL, over=DISPLACEABLE)
        if rng.random() < 0.45:
            gas_level = centre[1] + rng.uniform(0.0, 0.5) * radii[1]  # supine: gas rises anteriorly
            canvas.paint(box, loop & (canvas.grids(box)[1] > gas_level), Tissue.GAS, over=(Tissue.BOWEL,))
    centre = (0.35 * body.half_width, body.centre_ap + 0.12 * body.front, body.dome_left - rng.uniform(0.12, 0.18))
    radii = (rng.uniform(0.14, 0.2), rng.uniform(0.14, 0.2), rng.uniform(0.08, 0.12))
    box, stomach = _blob(canvas, rng, centre, radii, rng.uniform(-0.5, 0.5), warp=0.1)
    canvas.paint(box, stomach & body.cavity[box], Tissue.STOMACH_WALL, over=DISPLACEABLE)
    box, lumen = _blob(canvas, rng, centre, tuple(0.8 * r for r in radii), warp=0.05)
    canvas.paint(box, lumen, Tissue.FLUID, over=(Tissue.STOMACH_WALL,))
    gas_level = centre[1] + rng.uniform(-0.2, 0.6) * radii[1]
    canvas.paint(box, lumen & (canvas.grids(box)[1] > gas_level), Tissue.GAS, over=(Tissue.FLUID,))


def _paint_spleen(canvas: _Canvas, rng: np.random.Generator, body: _Body) -> None:
    """A crescent against the left posterolateral wall, below the left dome, hilum facing inwards."""
    centre = (0.62 * body.half_width, body.centre_ap - rng.uniform(0.25, 0.35) * body.back, rng.uniform(0.58, 0.68))
    radii = (rng.uniform(0.09, 0.12), rng.uniform(0.22, 0.28), rng.uniform(0.12, 0.16))
    box, spleen = _blob(canvas, rng, centre, radii, rng.uniform(-0.9, -0.5), warp=0.12)
    lr, ap, si = canvas.grids(box)
    hilum_lr, hilum_ap = centre[0] - 1.7 * radii[0], centre[1] + 0.3 * radii[1]
    notch = ((lr - hilum_lr) / radii[0]) ** 2 + ((ap - hilum_ap) / (0.7 * radii[1])) ** 2 <= 1
    spleen &= ~notch & body.cavity[box] & (si <= body.dome[box[0], box[1]])
    canvas.paint(box, spleen, Tissue.SPLEEN, over=DISPLACEABLE + (Tissue.STOMACH_WALL,))


def _paint_liver(canvas: _Canvas, rng: np.random.Generator, body: _Body) -> None:
    """Right, left and caudate lobes under the right dome with portal vessels, hypodense tumours
    and a gallbladder. The liver stays between its lowest tip and the dome, so the slices above
    and below hold none."""
    bottom = rng.uniform(0.3, 0.4)
    span = body.dome_right - bottom
    lobes = [  # (centre, radii) of the right, left and caudate lobes
        (
            (-0.45 * body.half_width, body.centre_ap + rng.uniform(-0.08, 0.05), bottom + 0.5 * span),
            (0.42 * body.half_width, 0.75 * body.front, 0.5 * span),
        ),
        (
            (rng.uniform(0.0, 0.15), body.centre_ap + 0.32 * body.front, body.dome_right - 0.25 * span),
            (rng.uniform(0.22, 0.32), 0.3 * body.front, 0.25 * span),
        ),
        ((body.spine_lr - 0.12, body.aorta_ap + 0.06, body.dome_right - 0.35 * span), (0.1, 0.08, 0.2 * span)),
    ]
    for centre, radii in lobes:
        box, lobe = _blob(canvas, rng, centre, radii, rng.uniform(-0.3, 0.3), warp=0.12)
        si = canvas.grids(box)[2]
        lobe &= body.cavity[box] & (si <= body.dome[box[0], box[1]]) & (si >= bottom)
        canvas.paint(box, lobe, Tissue.LIVER, over=DISPLACEABLE + (Tissue.STOMACH_WALL, Tissue.FLUID))
    liver_voxels = np.flatnonzero(canvas.tissue == Tissue.LIVER)

    def random_liver_point() -> np.ndarray:
        i, j, k = np.unravel_index(liver_voxels[rng.integers(liver_voxels.size)], canvas.tissue.shape)
        return np.array([canvas.lr[i], canvas.ap[j], canvas.si[k]])

    hilum = np.array([body.spine_lr - 0.18, body.aorta_ap + 0.1, bottom + 0.45 * span])
    for _ in range(int(rng.integers(4, 8)) if liver_voxels.size else 0):
        vessel = _segment_tube(canvas, hilum, random_liver_point(), rng.uniform(0.012, 0.025), body.si_to_units)
        canvas.paint(*vessel, Tissue.LIVER_VESSEL, over=(Tissue.LIVER,))
    tumours = 0 if rng.random() < 0.15 or not liver_voxels.size else int(rng.integers(1, 5))
    for _ in range(tumours):
        centre, r = random_liver_point(), rng.uniform(0.025, 0.09)
        tumour = _blob(canvas, rng, centre, (r, r * rng.uniform(0.8, 1.2), r / body.si_to_units), warp=0.15)
        canvas.paint(*tumour, Tissue.TUMOUR, over=(Tissue.LIVER, Tissue.LIVER_VESSEL))
    if rng.random() < 0.8:
        centre = (-0.25 * body.half_width, body.centre_ap + 0.15 * body.front, bottom + rng.uniform(0.08, 0.14))
        radii = (0.06, 0.09, 0.09 / body.si_to_units)
        gallbladder = _blob(canvas, rng, centre, radii, rng.uniform(0, np.pi), warp=0.1)
        canvas.paint(*gallbladder, Tissue.FLUID, over=(Tissue.LIVER, Tissue.LIVER_VESSEL) + DISPLACEABLE)
    intrahepatic = canvas.si < body.dome_right  # the IVC runs through the liver but is not liver
    canvas.paint_extruded(
        _vena_cava(canvas, body), Tissue.VENA_CAVA, intrahepatic, over=(Tissue.LIVER, Tissue.LIVER_VESSEL)
    )


PAINTERS = (
    _paint_body_wall,
    _paint_spine,
    _paint_chest,
    _paint_retroperitoneum,
    _paint_bowel_and_stomach,
    _paint_spleen,
    _paint_liver,
)  # in painting order: later organs displace only soft tissue painted before them


def _draw_anatomy(rng: np.random.Generator, size: int, slices: int, si_to_units: float) -> np.ndarray:
    """Paint one random abdomen; returns the tissue volume (size, size, slices) uint8 of :class:`Tissue`.

    ``si_to_units`` converts a scan-length fraction into in-plane units (scan length / half FOV),
    so tubes and tumours stay round in millimetres.
    """
    canvas = _Canvas(size, slices)
    body = _plan_body(canvas, rng, si_to_units)
    for paint in PAINTERS:
        paint(canvas, rng, body)
    return canvas.tissue


def tissue_labels(tissue: np.ndarray, layout: str) -> np.ndarray:
    """The label volume of ``layout`` for a tissue volume.

    Args:
        tissue: (X, Y, Z) uint8 of :class:`Tissue` values.
        layout: ``"lits"`` (1 liver including its vessels, 2 tumour) or ``"msd-spleen"`` (1 spleen).

    Returns:
        uint8 array of the same shape.
    """
    check_layout(layout)
    table = np.zeros(len(Tissue), np.uint8)
    if layout == "lits":
        table[[Tissue.LIVER, Tissue.LIVER_VESSEL]] = 1
        table[Tissue.TUMOUR] = 2
    else:
        table[Tissue.SPLEEN] = 1
    return table[tissue]


def synthesize_volume(
    rng: np.random.Generator, size: int = 128, slices: int = 48, flip_ap: bool = False, fov_scale: float = 1.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One random abdominal CT volume.

    Args:
        rng: the source of randomness (same state -> identical output).
        size: in-plane voxels (X = Y = size).
        slices: number of axial slices Z.
        flip_ap: store the antero-posterior axis reversed (positive ``y`` spacing in the affine).
        fov_scale: >= 1; the anatomy is drawn on ``size / fov_scale`` voxels and padded with air
            to ``size``: the same body in a field of view (and pixel spacing) ``fov_scale`` times
            larger, as a scan reconstructed with a wider field of view. 1 draws on all voxels.

    Returns:
        ``(image, tissue, affine)``: image int16 (X, Y, Z) in HU (-1024 outside the reconstruction
        circle), tissue uint8 (X, Y, Z) of :class:`Tissue`, and the 4x4 voxel-to-RAS affine in mm.

    Raises:
        ValueError: if ``size`` < 32 or ``slices`` < 8.
    """
    if size < 32 or slices < 8:
        raise ValueError(f"phantom needs size >= 32 and slices >= 8, got size={size}, slices={slices}")
    if not fov_scale >= 1:
        raise ValueError(f"fov_scale must be >= 1, got {fov_scale}")
    inner = size if fov_scale == 1 else max(32, round(size / fov_scale))  # voxels across the anatomy
    field_of_view = rng.uniform(0.6, 0.9) * 512  # mm: 0.6-0.9 mm pixels at 512
    thickness = float(np.clip(rng.uniform(200, 260) / slices, 0.7, 5.0))
    spacing = (field_of_view / inner, field_of_view / inner, thickness)
    tissue = _draw_anatomy(rng, inner, slices, si_to_units=slices * thickness / (field_of_view / 2))
    image = _render_hu(rng, tissue, pixel_mm=spacing[0])
    if inner < size:
        pad = ((size - inner) // 2, size - inner - (size - inner) // 2)
        image = np.pad(image, (pad, pad, (0, 0)), constant_values=-1024)
        tissue = np.pad(tissue, (pad, pad, (0, 0)), constant_values=Tissue.AIR)
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = [
        (size - 1) / 2 * spacing[0] + rng.uniform(-20, 20),
        (size - 1) / 2 * spacing[1] + rng.uniform(-10, 60),
        rng.uniform(-700, -100),
    ]
    if flip_ap:
        image, tissue = image[:, ::-1].copy(), tissue[:, ::-1].copy()
        affine[1, 3] -= (size - 1) * spacing[1]
        affine[1, 1] = spacing[1]
    return image, tissue, affine


def _render_hu(rng: np.random.Generator, tissue: np.ndarray, pixel_mm: float) -> np.ndarray:
    """HU image of a tissue volume: per-case tissue means, smooth shading, blur, correlated noise."""
    means = np.array([rng.uniform(*TISSUE_HU[kind]) for kind in Tissue], np.float32)
    size = tissue.shape[0]
    centres = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    x, y = centres[:, None], centres[None, :]
    shading = (
        rng.uniform(3, 8) * np.sin(rng.uniform(1, 3) * x + rng.uniform(0, 2 * np.pi)) * np.cos(rng.uniform(1, 3) * y)
    )
    noise_hu = rng.uniform(10, 20)
    # Blur signal and noise together (scanner point spread, ~0.6 mm), boosting the noise first so
    # that it keeps its standard deviation after the blur and gains CT's fine-grained texture.
    sigma = max(0.6 / pixel_mm, 0.35)
    kernel = ndimage.gaussian_filter1d(np.eye(1, 15, 7, dtype=np.float64)[0], sigma, mode="constant", truncate=3.0)
    gain = 1 / float(kernel @ kernel)  # each 1-D pass divides white-noise variance by this
    hu = means[tissue] + shading[:, :, None].astype(np.float32)
    hu += rng.standard_normal(hu.shape, dtype=np.float32) * np.float32(noise_hu * gain)
    hu = ndimage.gaussian_filter(hu, sigma=(sigma, sigma, 0), mode="nearest", truncate=3.0)
    hu[(x**2 + y**2) > 1] = -1024  # outside the reconstruction circle
    np.clip(hu, -1024, 3071, out=hu)
    return np.rint(hu, out=hu).astype(np.int16)


def _case_ids(layout: str, cases: int, rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """Random case numbers: (labelled, unlabelled). LiTS: about a quarter in 0-27 (the paper's
    test range), the rest in 28-130. MSD: non-contiguous ids; about a fifth go to imagesTs."""
    if layout == "lits":
        test = min(max(1, round(cases / 4)), len(LITS_TEST_IDS), cases)
        if cases - test > len(LITS_TRAIN_IDS):
            raise ConfigError(f"data.synth_cases: LiTS has case numbers 0-130 only; got {cases} cases (at most 131)")
        chosen = list(rng.choice(LITS_TEST_IDS, test, replace=False)) + list(
            rng.choice(LITS_TRAIN_IDS, cases - test, replace=False)
        )
        return sorted(int(number) for number in chosen), []
    numbers = sorted(int(number) for number in rng.choice(np.arange(1, max(64, 2 * cases + 2)), cases, replace=False))
    unlabelled = set(rng.choice(numbers, max(1, cases // 5), replace=False)) if cases >= 3 else set()
    return [n for n in numbers if n not in unlabelled], sorted(int(n) for n in unlabelled)


def _save(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    image = nib.Nifti1Image(array, affine)
    image.header.set_xyzt_units("mm", "sec")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, path)  # inside the staging folder, which is moved into place as a whole


def _msd_description(seed: int, labelled: list[int], unlabelled: list[int]) -> dict:
    return {
        "name": "Spleen",
        "description": f"Spleen Segmentation (synthetic CT phantom from `unet3plus synth`, seed {seed})",
        "reference": "Memorial Sloan Kettering Cancer Center (layout); synthetic data by unet3plus",
        "licence": "CC-BY-SA 4.0",
        "release": "1.0 06/08/2018",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "spleen"},
        "numTraining": len(labelled),
        "numTest": len(unlabelled),
        "training": [
            {"image": f"./imagesTr/spleen_{n}.nii.gz", "label": f"./labelsTr/spleen_{n}.nii.gz"} for n in labelled
        ],
        "test": [f"./imagesTs/spleen_{n}.nii.gz" for n in unlabelled],
    }


def write_dataset(
    layout: str, out_dir: str | Path, *, cases: int, seed: int, size: int = 128, slices: int = 48,
    force: bool = False, fov_range: tuple[float, float] = (1.0, 1.0),
) -> list[Path]:
    """Write a synthetic dataset in the published LiTS or MSD Task09_Spleen layout.

    LiTS: ``volume-N.nii`` (int16 HU) and ``segmentation-N.nii`` (uint8: 0, 1 liver, 2 tumour),
    uncompressed as in the real release. MSD: ``dataset.json``, ``imagesTr/spleen_N.nii.gz``,
    ``labelsTr/spleen_N.nii.gz`` (0, 1 spleen) and unlabelled ``imagesTs/spleen_N.nii.gz``.
    The dataset is built in a hidden sibling folder and moved into place at the end, so
    ``out_dir`` never holds a partial dataset. The same arguments give byte-identical files.

    Args:
        layout: ``"lits"`` or ``"msd-spleen"``.
        out_dir: destination folder; must be absent, empty, or an earlier synthetic dataset that
            nobody added files to or changed since (see :func:`unet3plus.utils.check_replaceable`).
        force: replace ``out_dir`` whatever it holds.
        fov_range: each case's ``fov_scale`` (:func:`synthesize_volume`) is drawn uniformly from
            this range (from its own random stream, so (1, 1) gives the default phantom's bytes).
        cases: number of volumes (LiTS at most 131), including MSD's unlabelled test images.
        seed: random seed.
        size: in-plane voxels (128 for CPU work, 512 like the real scans).
        slices: axial slices per volume.

    Returns:
        The image paths written (one per case), sorted by case number.

    Raises:
        ConfigError: for ``cases`` < 1, too many LiTS cases, ``size`` < 32 or ``slices`` < 8.
        DataError: if ``out_dir`` holds other data (it is never overwritten).
        ValueError: for an unknown ``layout``.
    """
    check_layout(layout)
    if cases < 1 or size < 32 or slices < 8:
        raise ConfigError(
            f"synth needs cases >= 1, size >= 32 and slices >= 8; got cases={cases}, size={size}, slices={slices}"
        )
    if not 1 <= fov_range[0] <= fov_range[1] <= 8:
        raise ConfigError(f"synth --fov-range {fov_range[0]:g} {fov_range[1]:g}: expected 1 <= LOW <= HIGH <= 8")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir}: exists and is not a folder; choose another --out")
    if not force:
        check_replaceable(out_dir, [out_dir], "use another --out, or --force to replace the whole folder")
    layout_code = {"lits": 0, "msd-spleen": 1}[layout]
    labelled, unlabelled = _case_ids(layout, cases, np.random.default_rng([seed, layout_code]))
    with staged_dir(out_dir) as staging:
        images = []
        for number in tqdm(sorted(labelled + unlabelled), desc=f"synth {layout}", unit="case", disable=None):
            rng = np.random.default_rng([seed, layout_code, number])
            flip_ap = layout == "lits" and rng.random() < 0.25
            fov_scale = 1.0
            if tuple(fov_range) != (1.0, 1.0):
                fov_scale = float(np.random.default_rng([seed, layout_code, number, 1]).uniform(*fov_range))
            image, tissue, affine = synthesize_volume(rng, size, slices, flip_ap, fov_scale)
            logger.debug("case %d: voxel spacing %s mm", number, np.abs(np.diag(affine)[:3]).round(3))
            if layout == "lits":
                image_path, label_path = Path(f"volume-{number}.nii"), Path(f"segmentation-{number}.nii")
            elif number in unlabelled:
                image_path, label_path = Path(f"imagesTs/spleen_{number}.nii.gz"), None
            else:
                image_path, label_path = (
                    Path(f"imagesTr/spleen_{number}.nii.gz"),
                    Path(f"labelsTr/spleen_{number}.nii.gz"),
                )
            _save(image, affine, staging / image_path)
            if label_path is not None:
                _save(tissue_labels(tissue, layout), affine, staging / label_path)
            images.append(out_dir / image_path)
        if layout == "msd-spleen":
            (staging / "dataset.json").write_text(
                json.dumps(_msd_description(seed, labelled, unlabelled), indent=4) + "\n"
            )
        parameters = {"layout": layout, "cases": cases, "seed": seed, "size": size, "slices": slices}
        if tuple(fov_range) != (1.0, 1.0):
            parameters["fov_range"] = list(fov_range)
        (staging / MARKER).write_text(json.dumps(parameters, indent=2) + "\n")
        record_outputs(staging, [staging])
    return images


def _preview_slices(area: np.ndarray) -> list[int]:
    """Four slice indices: one without the organ, then three spread over the organ from top to bottom."""
    present = np.flatnonzero(area)
    absent = np.flatnonzero(area == 0)
    if present.size == 0:
        return list(np.linspace(0, area.size - 1, 4).round().astype(int))
    free = [int(absent[np.argmin(np.abs(absent - present.mean()))])] if absent.size else []
    return free + [int(present[int(fraction * (present.size - 1))]) for fraction in (0.85, 0.5, 0.15)]


def render_preview(layout: str, raw_dir: str | Path, png_path: str | Path) -> Path:
    """Draw four axial slices of up to two labelled cases with the organ outlined.

    Slices are shown in radiological convention (patient's right on the image's left, anterior
    up) whatever the file orientation, in an abdominal window (level 40, width 400 HU), with the
    organ contour in red (LiTS tumours in yellow).

    Args:
        layout: ``"lits"`` or ``"msd-spleen"``.
        raw_dir: dataset folder.
        png_path: the PNG to write (atomically).

    Returns:
        ``png_path`` as a :class:`Path`.

    Raises:
        DataError: if the dataset has no labelled case or a file cannot be read.
    """
    from matplotlib.figure import Figure

    labelled = [case for case in discover_cases(layout, raw_dir) if case.label is not None][:2]
    if not labelled:
        raise DataError(f"{raw_dir}: no labelled case to preview")
    figure = Figure(figsize=(16, 4.2 * len(labelled)), layout="constrained")
    axes = figure.subplots(len(labelled), 4, squeeze=False)
    to_lps = nib.orientations.axcodes2ornt(("L", "P", "S"))
    for row, case in zip(axes, labelled):
        image, label = read_volume(case.image), read_volume(case.label)
        transform = nib.orientations.ornt_transform(nib.orientations.io_orientation(image.affine), to_lps)
        image, label = image.as_reoriented(transform), label.as_reoriented(transform)
        hu, labels = np.asanyarray(image.dataobj), np.asanyarray(label.dataobj)
        organ = organ_mask(labels, layout)
        zooms = image.header.get_zooms()
        for axis in row:  # panels left without a slice stay blank
            axis.set_axis_off()
        for axis, k in zip(row, _preview_slices(organ.sum(axis=(0, 1)))):
            axis.imshow(
                hu[:, :, k].T,
                cmap="gray",
                vmin=WINDOW_HU[0],
                vmax=WINDOW_HU[1],
                aspect=zooms[1] / zooms[0],
                interpolation="nearest",
            )
            if organ[:, :, k].any():
                axis.contour(organ[:, :, k].T, levels=[0.5], colors="red", linewidths=1.0)
            if layout == "lits" and (labels[:, :, k] == 2).any():
                axis.contour((labels[:, :, k] == 2).T, levels=[0.5], colors="yellow", linewidths=0.8)
            status = f"{int(organ[:, :, k].sum())} organ px" if organ[:, :, k].any() else "no organ"
            axis.set_title(f"{case.image.name}  slice {k}/{hu.shape[2]}  ({status})", fontsize=9)
    figure.suptitle(
        f"{raw_dir}: {DATASET_OF_LAYOUT[layout]} outline in red; window L40/W400 HU; patient's right on image left",
        fontsize=11,
    )
    with atomic_path(png_path) as tmp:
        figure.savefig(tmp, format="png", dpi=90)
    return Path(png_path)
