"""Procedural CT-like phantoms with label maps, for demos, training and evaluation without patient data.

A phantom is a body (fat, muscle wall, soft-tissue cavity) with a spine, ribs, a few organ-like blobs and
lesion-like blobs inside some organs. Every shape is defined in physical millimetres, so one seed gives
the same anatomy whatever the voxel grid; the grid itself (spacing, orientation, origin) is drawn at
random like the variety of real scans. One numpy generator seeded with `seed` draws everything, and
every draw that does not depend on the grid size comes first, so `max_voxels` changes only resolution.
"""

from __future__ import annotations

import itertools
import json
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import SimpleITK as sitk

from .atomic import atomic_destination, write_text_atomic
from .errors import InputError
from .imageio import write_image_atomic

DEFAULT_MAX_VOXELS = 256 * 256 * 100
MIN_MAX_VOXELS = 64**3
AIR_HU = -1000
IMAGE_FILE = "image.nii.gz"
LABEL_FILE = "label.nii.gz"
LABELS_JSON = "labels.json"
INCOMPLETE_KEY = "incomplete"  # in labels.json while the phantom's volumes are being written

# Labelled objects stay this far (mm) inside the nominal field of view: more than two voxels even at
# the coarsest spacing MIN_MAX_VOXELS allows, so no label touches the volume border.
BORDER_MARGIN_MM = 20.0
OBJECT_GAP_MM = 4.0
CAVITY_MARGIN_MM = 5.0
LESION_MARGIN_MM = 2.0
TEXTURE_LATTICE_MM = 4.0
MIN_ORGAN_MM, MAX_ORGAN_MM = 15.0, 90.0  # largest diameter, before any shrinking to fit
MIN_LESION_MM, MAX_LESION_MM = 5.0, 30.0
ORGAN_MAX_DEFORMATION = 0.15
LESION_MAX_DEFORMATION = 0.1

Block = tuple[slice, slice, slice]
Coordinates = tuple[np.ndarray, np.ndarray, np.ndarray]


@dataclass(frozen=True)
class Phantom:
    """A CT-like image (int16 HU) and its label map (uint8) on the same LPS grid."""

    image: sitk.Image
    label: sitk.Image
    label_names: dict[int, str]
    lesion_hosts: dict[int, int]  # lesion label id -> id of the organ that contains it
    seed: int


# ----------------------------------------------------------------------------------------------- grid


@dataclass(frozen=True)
class _GridPlan:
    """The drawn acquisition: field of view and finest spacing per image axis, orientation, centre."""

    physical_fov: np.ndarray  # mm along LPS x (to the left), y (to the back), z (to the head)
    spacing: np.ndarray  # mm per image axis (i, j, k), before fitting into max_voxels
    direction: np.ndarray  # column a: LPS direction of image axis a
    center: np.ndarray  # LPS position of the grid centre; the anatomy is defined relative to it

    @property
    def field_of_view(self) -> np.ndarray:
        """mm per image axis: that of the patient axis the image axis runs (mostly) along."""
        return self.physical_fov[np.argmax(np.abs(self.direction), axis=0)]


@dataclass(frozen=True)
class _Grid:
    """The voxel grid: sizes and spacing per image axis, LPS direction columns, centre position."""

    size: tuple[int, int, int]  # voxels per image axis (i, j, k)
    spacing: np.ndarray
    direction: np.ndarray
    center: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        """The numpy array shape, (k, j, i)."""
        return self.size[2], self.size[1], self.size[0]

    @property
    def origin(self) -> np.ndarray:
        half_extent = self.spacing * (np.array(self.size) - 1) / 2.0
        return self.center - self.direction @ half_extent

    def coordinates(self, block: Block) -> Coordinates:
        """Patient-frame (LPS, mm from the grid centre) x, y, z of the voxels of `block`.

        Each is broadcastable to the block's shape; axis-aligned grids keep them one-dimensional.
        """
        offsets = []
        for axis in range(3):
            numpy_axis = 2 - axis
            index = np.arange(self.size[axis], dtype=np.float32)[block[numpy_axis]]
            along = (index - (self.size[axis] - 1) / 2.0) * np.float32(self.spacing[axis])
            shape = [1, 1, 1]
            shape[numpy_axis] = along.size
            offsets.append(along.reshape(shape))
        result = []
        for row in self.direction:
            terms = [np.float32(weight) * offset for weight, offset in zip(row, offsets) if abs(weight) > 1e-9]
            result.append(sum(terms[1:], terms[0]))
        return result[0], result[1], result[2]

    def reach(self, patient_axis: int) -> float:
        """How far (mm) the grid extends from its centre along a patient axis."""
        half_extent = self.spacing * (np.array(self.size) - 1) / 2.0
        return float(np.abs(self.direction[patient_axis]) @ half_extent)

    def block_around(self, low: np.ndarray, high: np.ndarray) -> Block:
        """The voxel block (numpy order) covering the patient-frame box [low, high], clipped to the grid."""
        corners = np.array(list(itertools.product(*zip(low, high))))
        index = (corners @ self.direction) / self.spacing + (np.array(self.size) - 1) / 2.0
        begin = np.clip(np.floor(index.min(axis=0)).astype(int) - 1, 0, self.size)
        end = np.clip(np.ceil(index.max(axis=0)).astype(int) + 2, 0, self.size)
        return tuple(slice(int(begin[a]), int(end[a])) for a in (2, 1, 0))

    def to_image(self, array: np.ndarray) -> sitk.Image:
        image = sitk.GetImageFromArray(array)
        image.SetSpacing([float(s) for s in self.spacing])
        image.SetOrigin([float(o) for o in self.origin])
        image.SetDirection([float(d) for d in self.direction.flatten()])
        return image


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3-D rotation (from a random unit quaternion)."""
    quaternion = rng.standard_normal(4)
    w, x, y, z = quaternion / np.linalg.norm(quaternion)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ]
    )


def _small_rotation(rng: np.random.Generator, max_degrees: float) -> np.ndarray:
    """A rotation by a few degrees about a random axis (Rodrigues' formula)."""
    axis = rng.standard_normal(3)
    axis /= np.linalg.norm(axis)
    angle = np.radians(rng.uniform(1.0, max_degrees))
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross


def _draw_direction(rng: np.random.Generator) -> np.ndarray:
    """Mostly axial, sometimes sagittal or coronal slices; random flips; now and then slightly oblique."""
    slice_axis = 2 if rng.random() < 0.7 else int(rng.integers(0, 2))
    in_plane = [axis for axis in range(3) if axis != slice_axis]
    if rng.random() < 0.2:
        in_plane.reverse()
    signs = rng.choice([-1.0, 1.0], size=3)
    direction = np.zeros((3, 3))
    for image_axis, physical_axis in enumerate([*in_plane, slice_axis]):
        direction[physical_axis, image_axis] = signs[image_axis]
    if rng.random() < 0.25:
        direction = _small_rotation(rng, max_degrees=6.0) @ direction
    return direction


def _draw_grid_plan(rng: np.random.Generator) -> _GridPlan:
    in_plane_fov = rng.uniform(250.0, 350.0)
    length = rng.uniform(150.0, 250.0)
    in_plane_spacing = rng.uniform(0.6, 1.2)
    slice_spacing = rng.uniform(1.0, 5.0)
    direction = _draw_direction(rng)
    center = np.array([rng.uniform(-50, 50), rng.uniform(-50, 50), rng.uniform(-400, 200)])
    spacing = np.array([in_plane_spacing, in_plane_spacing, slice_spacing])
    return _GridPlan(np.array([in_plane_fov, in_plane_fov, length]), spacing, direction, center)


def _fit_grid(plan: _GridPlan, max_voxels: int) -> _Grid:
    """The plan's grid, with its finest spacings coarsened just enough to stay within max_voxels."""

    def sizes(floor: float) -> np.ndarray:
        return np.maximum(np.round(plan.field_of_view / np.maximum(plan.spacing, floor)), 1).astype(int)

    floor = 0.0
    if np.prod(sizes(floor)) > max_voxels:
        low, high = float(plan.spacing.min()), float(plan.field_of_view.max())
        for _ in range(60):
            middle = (low + high) / 2.0
            low, high = (low, middle) if np.prod(sizes(middle)) <= max_voxels else (middle, high)
        floor = high
    size = sizes(floor)
    return _Grid(
        size=(int(size[0]), int(size[1]), int(size[2])),
        spacing=np.maximum(plan.spacing, floor),
        direction=plan.direction,
        center=plan.center,
    )


# ------------------------------------------------------------------------------------------- anatomy


@dataclass(frozen=True)
class _Body:
    """An elliptical cylinder whose girth varies slowly with z: fat layer, muscle wall, soft-tissue cavity."""

    half_width: float  # mm, left-right
    half_depth: float  # mm, anterior-posterior
    offset: tuple[float, float]  # in-plane shift from the grid centre
    fat: float  # thickness, mm
    muscle: float
    wave_amplitude: float  # slow change of girth along z
    wave_length: float
    wave_phase: float
    fat_hu: float
    muscle_hu: float
    cavity_hu: float

    @property
    def min_scale(self) -> float:
        return 1.0 - self.wave_amplitude

    @property
    def cavity_axes(self) -> tuple[float, float]:
        inset = self.fat + self.muscle
        return self.half_width - inset, self.half_depth - inset

    def scale(self, z: np.ndarray) -> np.ndarray:
        return 1.0 + self.wave_amplitude * np.sin(2 * np.pi * z / self.wave_length + self.wave_phase)

    def in_plane(self, coordinates: Coordinates) -> tuple[np.ndarray, np.ndarray]:
        """In-plane position from the body axis, divided by the girth scale at that height."""
        x, y, z = coordinates
        scale = self.scale(z)
        return (x - np.float32(self.offset[0])) / scale, (y - np.float32(self.offset[1])) / scale

    def inside(self, in_plane: tuple[np.ndarray, np.ndarray], inset: float) -> np.ndarray:
        """Voxels inside the body outline shrunk by `inset` mm."""
        u = in_plane[0] / np.float32(self.half_width - inset)
        v = in_plane[1] / np.float32(self.half_depth - inset)
        return u * u + v * v < 1.0


def _draw_body(rng: np.random.Generator, in_plane_fov: float) -> _Body:
    half_width = rng.uniform(0.36, 0.41) * in_plane_fov
    return _Body(
        half_width=half_width,
        half_depth=half_width * rng.uniform(0.72, 0.88),
        offset=(rng.uniform(-8, 8), rng.uniform(-8, 8)),
        fat=rng.uniform(5.0, 20.0),
        muscle=rng.uniform(10.0, 16.0),
        wave_amplitude=rng.uniform(0.0, 0.04),
        wave_length=rng.uniform(200.0, 400.0),
        wave_phase=rng.uniform(0, 2 * np.pi),
        fat_hu=rng.uniform(-120, -80),
        muscle_hu=rng.uniform(35, 60),
        cavity_hu=rng.uniform(0, 40),
    )


@dataclass(frozen=True)
class _Spine:
    """Vertebral bodies and discs, posterior arch with canal, spinous process, paraspinal muscles."""

    x: float
    y: float  # centre of the vertebral bodies
    radius_x: float
    radius_y: float
    cortex: float  # mm
    period: float  # vertebra plus disc height
    disc: float
    phase: float
    cancellous_hu: float
    cortical_hu: float
    disc_hu: float
    csf_hu: float

    @property
    def arch_y(self) -> float:
        return self.y + self.radius_y + 10.0

    def obstacles(self) -> list[tuple[float, float, float]]:
        """In-plane circles (x, y, radius) organs must stay out of."""
        return [
            (self.x, self.y, max(self.radius_x, self.radius_y) + 3.0),
            (self.x, self.arch_y, 14.0),
            (self.x - 25.0, self.arch_y + 8.0, 24.0),
            (self.x + 25.0, self.arch_y + 8.0, 24.0),
        ]


def _draw_spine(rng: np.random.Generator, body: _Body) -> _Spine:
    radius_x = rng.uniform(16, 24)
    radius_y = radius_x * rng.uniform(0.75, 0.9)
    # The spinous process tip (arch + 26 mm) stays inside the muscle, even where the body is narrowest.
    y = body.offset[1] + (body.half_depth - body.fat) * body.min_scale - radius_y - 40.0
    return _Spine(
        x=body.offset[0],
        y=y,
        radius_x=radius_x,
        radius_y=radius_y,
        cortex=rng.uniform(1.5, 2.5),
        period=rng.uniform(26, 36),
        disc=rng.uniform(4, 8),
        phase=rng.uniform(0, 40),
        cancellous_hu=rng.uniform(300, 450),
        cortical_hu=rng.uniform(700, 1200),
        disc_hu=rng.uniform(60, 100),
        csf_hu=rng.uniform(0, 15),
    )


@dataclass(frozen=True)
class _Ribs:
    """Evenly spaced tubes along an ellipse in the muscle wall, sloping down anteriorly."""

    radius: float
    period: float
    lowest: float  # z below which there are no ribs
    tilt: float  # mm the rib rises from front to back
    anterior_end: float  # fraction of the half depth where the bony rib ends in front
    hu: float


def _draw_ribs(rng: np.random.Generator, length: float) -> _Ribs:
    return _Ribs(
        radius=rng.uniform(3.0, 4.5),
        period=rng.uniform(24, 34),
        lowest=rng.uniform(-0.5, 0.3) * length,
        tilt=rng.uniform(8, 20),
        anterior_end=rng.uniform(0.2, 0.7),
        hu=rng.uniform(400, 900),
    )


@dataclass(frozen=True)
class _Blob:
    """A smoothly deformed, rotated ellipsoid: inside where rho * (1 + bumps) < 1."""

    center: np.ndarray  # patient frame, mm
    semi_axes: np.ndarray
    rotation: np.ndarray  # columns: the blob's axes in the patient frame
    waves: np.ndarray  # (terms, 3) spatial frequencies in units of the semi-axes
    phases: np.ndarray
    amplitudes: np.ndarray  # their sum stays small so the shape is star-shaped and in one piece
    contrast: float  # HU above (or below) what surrounds it

    @property
    def deformation(self) -> float:
        return float(self.amplitudes.sum())

    @property
    def outer_radius(self) -> float:
        """No inside point is further from the centre."""
        return float(self.semi_axes.max()) / (1.0 - self.deformation)

    @property
    def inner_radius(self) -> float:
        """Every point this close to the centre is inside."""
        return float(self.semi_axes.min()) / (1.0 + self.deformation)

    def scaled(self, factor: float) -> _Blob:
        return _Blob(
            self.center, self.semi_axes * factor, self.rotation, self.waves, self.phases, self.amplitudes, self.contrast
        )

    def moved(self, center: np.ndarray) -> _Blob:
        return _Blob(center, self.semi_axes, self.rotation, self.waves, self.phases, self.amplitudes, self.contrast)

    def inside(self, coordinates: Coordinates) -> np.ndarray:
        relative = [coordinates[c] - np.float32(self.center[c]) for c in range(3)]
        local = []
        for axis in range(3):
            column = self.rotation[:, axis] / self.semi_axes[axis]
            local.append(sum(np.float32(column[c]) * relative[c] for c in range(3)))
        rho = np.sqrt(local[0] ** 2 + local[1] ** 2 + local[2] ** 2)
        bumps = 1.0
        for wave, phase, amplitude in zip(self.waves, self.phases, self.amplitudes):
            argument = local[0] * np.float32(wave[0]) + local[1] * np.float32(wave[1]) + local[2] * np.float32(wave[2])
            bumps = bumps + np.float32(amplitude) * np.sin(argument + np.float32(phase))
        return rho * bumps < 1.0


def _draw_contrast(rng: np.random.Generator) -> float:
    """Usually brighter than the surroundings (enhancing), sometimes darker (fluid, hypodense)."""
    if rng.random() < 0.7:
        return float(rng.uniform(20, 200))
    return -float(rng.uniform(20, 120))


def _draw_blob(rng: np.random.Generator, largest_diameter: float, max_deformation: float) -> _Blob:
    semi_axes = largest_diameter / 2.0 * np.array([1.0, rng.uniform(0.5, 1.0), rng.uniform(0.5, 1.0)])
    terms = 3
    directions = rng.standard_normal((terms, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    # Frequency times amplitude stays below ~0.5, which keeps rho * (1 + bumps) monotonic along rays.
    waves = directions * rng.uniform(1.0, 2.5, size=(terms, 1))
    amplitudes = rng.dirichlet(np.ones(terms)) * rng.uniform(0.03, max_deformation)
    return _Blob(
        center=np.zeros(3),
        semi_axes=semi_axes,
        rotation=_random_rotation(rng),
        waves=waves,
        phases=rng.uniform(0, 2 * np.pi, size=terms),
        amplitudes=amplitudes,
        contrast=_draw_contrast(rng),
    )


@dataclass(frozen=True)
class _Room:
    """Where organs may go: inside the cavity, off the spine, inside the field of view."""

    cavity_outline: np.ndarray  # (n, 2) points on the narrowest cavity ellipse
    cavity_axes: tuple[float, float]
    cavity_center: tuple[float, float]
    obstacles: list[tuple[float, float, float]]
    direction: np.ndarray
    half_field_of_view: np.ndarray  # per image axis

    def fits(self, center: np.ndarray, radius: float, placed: list[_Blob]) -> bool:
        along_axes = self.direction.T @ center
        if np.any(np.abs(along_axes) + radius > self.half_field_of_view - BORDER_MARGIN_MM):
            return False
        u = (center[0] - self.cavity_center[0]) / self.cavity_axes[0]
        v = (center[1] - self.cavity_center[1]) / self.cavity_axes[1]
        if u * u + v * v >= 1.0:
            return False
        to_outline = np.hypot(*(self.cavity_outline - center[:2]).T).min()
        if to_outline < radius + CAVITY_MARGIN_MM:
            return False
        for x, y, obstacle_radius in self.obstacles:
            if np.hypot(center[0] - x, center[1] - y) < radius + obstacle_radius + OBJECT_GAP_MM:
                return False
        return all(
            np.linalg.norm(center - other.center) >= radius + other.outer_radius + OBJECT_GAP_MM for other in placed
        )


def _make_room(body: _Body, spine: _Spine, plan: _GridPlan) -> _Room:
    axes = tuple(a * body.min_scale for a in body.cavity_axes)
    angles = np.linspace(0, 2 * np.pi, 720, endpoint=False)
    outline = np.stack([body.offset[0] + axes[0] * np.cos(angles), body.offset[1] + axes[1] * np.sin(angles)], 1)
    return _Room(outline, axes, body.offset, spine.obstacles(), plan.direction, plan.field_of_view / 2.0)


def _place_organs(rng: np.random.Generator, room: _Room, length: float) -> list[_Blob]:
    """3-6 organs at random free places; one that finds no place shrinks and tries again."""
    organs: list[_Blob] = []
    for _ in range(int(rng.integers(3, 7))):
        organ = _draw_blob(rng, rng.uniform(MIN_ORGAN_MM, MAX_ORGAN_MM), ORGAN_MAX_DEFORMATION)
        for _shrink in range(6):
            spot = _find_spot(rng, room, organ.outer_radius, organs, length)
            if spot is not None:
                organs.append(organ.moved(spot))
                break
            organ = organ.scaled(0.8)
    return organs


def _find_spot(
    rng: np.random.Generator, room: _Room, radius: float, placed: list[_Blob], length: float
) -> Optional[np.ndarray]:
    for _ in range(60):
        center = np.array(
            [
                room.cavity_center[0] + rng.uniform(-1, 1) * room.cavity_axes[0],
                room.cavity_center[1] + rng.uniform(-1, 1) * room.cavity_axes[1],
                rng.uniform(-0.5, 0.5) * length,
            ]
        )
        if room.fits(center, radius, placed):
            return center
    return None


def _place_lesions(rng: np.random.Generator, organs: list[_Blob]) -> list[tuple[int, _Blob]]:
    """(host organ index, lesion) pairs: lesions in about half the organs, in at least one if any has room."""
    hosts = [index for index in range(len(organs)) if rng.random() < 0.5]
    roomy = [index for index, organ in enumerate(organs) if _largest_lesion(organ) >= MIN_LESION_MM]
    if roomy and not set(hosts) & set(roomy):
        hosts = sorted([*hosts, max(roomy, key=lambda index: _largest_lesion(organs[index]))])
    lesions: list[tuple[int, _Blob]] = []
    for host in hosts:
        count = 1 if rng.random() < 0.7 else 2
        lesions += [(host, lesion) for lesion in _lesions_in(rng, organs[host], count)]
    return lesions


def _lesions_in(rng: np.random.Generator, organ: _Blob, count: int) -> list[_Blob]:
    """Up to `count` non-overlapping lesions that lie wholly inside the organ's sure-inside ball."""
    room = organ.inner_radius - LESION_MARGIN_MM
    largest = _largest_lesion(organ)
    lesions: list[_Blob] = []
    if largest < MIN_LESION_MM:
        return lesions
    for _ in range(count):
        lesion = _draw_blob(rng, rng.uniform(MIN_LESION_MM, largest), LESION_MAX_DEFORMATION)
        for _try in range(30):
            offset = rng.standard_normal(3)
            offset *= rng.uniform(0, 1) * (room - lesion.outer_radius) / np.linalg.norm(offset)
            center = organ.center + offset
            clear = LESION_MARGIN_MM + lesion.outer_radius
            if all(np.linalg.norm(center - other.center) >= clear + other.outer_radius for other in lesions):
                lesions.append(lesion.moved(center))
                break
    return lesions


def _largest_lesion(organ: _Blob) -> float:
    """Largest lesion diameter whose outer radius fits in the organ with a margin."""
    room = organ.inner_radius - LESION_MARGIN_MM
    return min(MAX_LESION_MM, 2.0 * room * (1.0 - LESION_MAX_DEFORMATION))


# ------------------------------------------------------------------------------------------ painting


def _paint_body(image: np.ndarray, grid: _Grid, body: _Body) -> np.ndarray:
    in_plane = body.in_plane(grid.coordinates((slice(None), slice(None), slice(None))))
    inside = np.broadcast_to(body.inside(in_plane, 0.0), grid.shape)
    image[inside] = body.fat_hu
    image[np.broadcast_to(body.inside(in_plane, body.fat), grid.shape)] = body.muscle_hu
    image[np.broadcast_to(body.inside(in_plane, body.fat + body.muscle), grid.shape)] = body.cavity_hu
    return inside


def _paint_spine(image: np.ndarray, body_mask: np.ndarray, grid: _Grid, spine: _Spine, body: _Body) -> None:
    reach = 60.0
    block = grid.block_around(
        np.array([spine.x - reach, spine.y - spine.radius_y - 5.0, -grid.reach(2)]),
        np.array([spine.x + reach, spine.arch_y + 40.0, grid.reach(2)]),
    )
    x, y, z = grid.coordinates(block)
    view, in_body = image[block], body_mask[block]
    dx, dy = x - np.float32(spine.x), y - np.float32(spine.y)
    bony_level = np.mod(z - np.float32(spine.phase), np.float32(spine.period)) >= spine.disc

    def paint(where: np.ndarray, hu: float) -> None:
        view[where & in_body] = hu

    for side in (-25.0, 25.0):
        paint(((dx - side) / 20.0) ** 2 + ((y - spine.arch_y - 8.0) / 16.0) ** 2 < 1.0, body.muscle_hu)
    outer = (dx / spine.radius_x) ** 2 + (dy / spine.radius_y) ** 2 < 1.0
    inner = (dx / (spine.radius_x - spine.cortex)) ** 2 + (dy / (spine.radius_y - spine.cortex)) ** 2 < 1.0
    paint(outer & ~bony_level, spine.disc_hu)
    paint(outer & bony_level, spine.cortical_hu)
    paint(inner & bony_level, spine.cancellous_hu)
    to_canal = np.hypot(dx, y - np.float32(spine.arch_y))
    paint((to_canal < 12.0) & bony_level, spine.cortical_hu)
    paint(((dx / 4.0) ** 2 + ((y - spine.arch_y - 16.0) / 10.0) ** 2 < 1.0) & bony_level, spine.cortical_hu)
    for side in (-20.0, 20.0):
        paint((((dx - side) / 11.0) ** 2 + ((y - spine.arch_y + 2.0) / 4.0) ** 2 < 1.0) & bony_level, spine.cortical_hu)
    paint(to_canal < 7.0, spine.csf_hu)


def _paint_ribs(image: np.ndarray, body_mask: np.ndarray, grid: _Grid, ribs: _Ribs, body: _Body, spine: _Spine) -> None:
    axis_x = body.half_width - body.fat - body.muscle / 2.0
    axis_y = body.half_depth - body.fat - body.muscle / 2.0
    scale_max = 1.0 + body.wave_amplitude
    reach = np.array([axis_x, axis_y]) * scale_max + ribs.radius + 2.0
    block = grid.block_around(
        np.array([body.offset[0] - reach[0], body.offset[1] - reach[1], ribs.lowest - ribs.tilt - ribs.radius]),
        np.array([body.offset[0] + reach[0], body.offset[1] + reach[1], grid.reach(2)]),
    )
    x, y, z = grid.coordinates(block)
    u, v = body.in_plane((x, y, z))
    level = (u / np.float32(axis_x)) ** 2 + (v / np.float32(axis_y)) ** 2 - 1.0
    slope = 2.0 * np.sqrt(u * u / np.float32(axis_x**4) + v * v / np.float32(axis_y**4))
    to_curve = level / np.maximum(slope, 1e-6)  # first-order distance to the rib ellipse
    along = z - np.float32(ribs.lowest) - np.float32(ribs.tilt / axis_y) * v
    to_rib = np.mod(along, np.float32(ribs.period)) - np.float32(ribs.period / 2.0)
    tube = (to_curve**2 + to_rib**2 < ribs.radius**2) & (along >= 0)
    bony = (v > -ribs.anterior_end * axis_y) & ((np.abs(u) > spine.radius_x + 12.0) | (v < 0))
    image[block][tube & bony & body_mask[block]] = ribs.hu


def _paint_blob(image: np.ndarray, label: np.ndarray, grid: _Grid, blob: _Blob, hu: float, label_id: int) -> None:
    reach = blob.outer_radius + 1.0
    block = grid.block_around(blob.center - reach, blob.center + reach)
    inside = np.broadcast_to(blob.inside(grid.coordinates(block)), image[block].shape)
    image[block][inside] = hu
    label[block][inside] = label_id


def _blur(image: np.ndarray, weight: float) -> None:
    """Partial-volume blur: a [w, 1-2w, w] kernel along each axis, in place, edges replicated."""
    for axis in range(3):
        moved = np.moveaxis(image, axis, 0)
        copy = moved.copy()
        moved *= 1.0 - 2.0 * weight
        moved[1:] += weight * copy[:-1]
        moved[:-1] += weight * copy[1:]
        moved[0] += weight * copy[0]
        moved[-1] += weight * copy[-1]


def _texture(rng: np.random.Generator, grid: _Grid) -> np.ndarray:
    """Unit-scale smooth noise: white noise on a ~4 mm lattice, linearly interpolated to the grid."""
    lattice = [max(2, int(np.ceil(n * s / TEXTURE_LATTICE_MM)) + 1) for n, s in zip(grid.shape, grid.spacing[::-1])]
    texture = rng.standard_normal(lattice).astype(np.float32)
    for axis, n in enumerate(grid.shape):
        texture = _interpolate_along(texture, axis, n)
    return texture


def _interpolate_along(values: np.ndarray, axis: int, count: int) -> np.ndarray:
    points = values.shape[axis]
    position = np.linspace(0.0, points - 1.0, count, dtype=np.float32)
    below = np.minimum(position.astype(int), points - 2)
    weight_shape = [1, 1, 1]
    weight_shape[axis] = count
    weight = (position - below).reshape(weight_shape)
    return np.take(values, below, axis=axis) * (1 - weight) + np.take(values, below + 1, axis=axis) * weight


# -------------------------------------------------------------------------------------------- public


def make_phantom(seed: int, max_voxels: int = DEFAULT_MAX_VOXELS) -> Phantom:
    """A CT-like phantom drawn from `seed`; `max_voxels` caps the grid size (coarser spacing, same anatomy)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"The phantom seed must be a non-negative integer, not {seed!r}; pass e.g. 0.")
    if max_voxels < MIN_MAX_VOXELS:
        raise InputError(f"max_voxels {max_voxels} is too small for a phantom; use at least {MIN_MAX_VOXELS}.")
    rng = np.random.default_rng(int(seed))
    plan = _draw_grid_plan(rng)
    in_plane_fov, length = float(plan.physical_fov[0]), float(plan.physical_fov[2])
    body = _draw_body(rng, in_plane_fov)
    spine = _draw_spine(rng, body)
    ribs = _draw_ribs(rng, length)
    organs = _place_organs(rng, _make_room(body, spine, plan), length)
    lesions = _place_lesions(rng, organs)
    noise_sigma, texture_hu, blur_weight = rng.uniform(5, 25), rng.uniform(3, 10), rng.uniform(0.06, 0.15)

    grid = _fit_grid(plan, max_voxels)
    image = np.full(grid.shape, AIR_HU, dtype=np.float32)
    label = np.zeros(grid.shape, dtype=np.uint8)
    body_mask = _paint_body(image, grid, body)
    _paint_spine(image, body_mask, grid, spine, body)
    _paint_ribs(image, body_mask, grid, ribs, body, spine)
    names, hosts = _paint_objects(image, label, grid, body, organs, lesions)
    _blur(image, blur_weight)
    image += np.float32(texture_hu) * _texture(rng, grid) * body_mask
    image += rng.standard_normal(grid.shape, dtype=np.float32) * np.float32(noise_sigma)
    hu = np.clip(np.rint(image), -1024, 3071).astype(np.int16)
    return Phantom(grid.to_image(hu), grid.to_image(label), names, hosts, int(seed))


def _paint_objects(
    image: np.ndarray,
    label: np.ndarray,
    grid: _Grid,
    body: _Body,
    organs: list[_Blob],
    lesions: list[tuple[int, _Blob]],
) -> tuple[dict[int, str], dict[int, int]]:
    """Organs, then lesions over them; ids are stable, and only objects with voxels are named."""
    names: dict[int, str] = {}
    hosts: dict[int, int] = {}
    organ_hu = [body.cavity_hu + organ.contrast for organ in organs]
    for index, organ in enumerate(organs):
        _paint_blob(image, label, grid, organ, organ_hu[index], index + 1)
    for number, (host, lesion) in enumerate(lesions, start=1):
        _paint_blob(image, label, grid, lesion, organ_hu[host] + lesion.contrast, len(organs) + number)
    present = set(np.flatnonzero(np.bincount(label.ravel(), minlength=256)).tolist())
    for index in range(len(organs)):
        if index + 1 in present:
            names[index + 1] = f"organ_{index + 1}"
    for number, (host, _lesion) in enumerate(lesions, start=1):
        if len(organs) + number in present:
            names[len(organs) + number] = f"lesion_{number}"
            hosts[len(organs) + number] = host + 1
    return names, hosts


def write_phantom(phantom: Phantom, out_dir: Path) -> tuple[Path, Path]:
    """Write image.nii.gz, label.nii.gz and labels.json into out_dir, each whole or not at all."""
    out_dir = Path(out_dir)
    image_path, label_path = out_dir / IMAGE_FILE, out_dir / LABEL_FILE
    description = {
        "seed": phantom.seed,
        "labels": {str(k): v for k, v in sorted(phantom.label_names.items())},
        "lesion_hosts": {str(k): v for k, v in sorted(phantom.lesion_hosts.items())},
    }
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with ExitStack() as staged:
            # Both volumes are written beside their targets first (the slow part: a failure leaves the folder as
            # it was); while they are renamed into place the description says the folder is incomplete, so an
            # interruption between the renames never leaves a seed's image beside another's label unannounced.
            for image, path in ((phantom.image, image_path), (phantom.label, label_path)):
                write_image_atomic(image, staged.enter_context(atomic_destination(path, ".nii.gz")))
            write_text_atomic(out_dir / LABELS_JSON, json.dumps({**description, INCOMPLETE_KEY: True}, indent=2) + "\n")
        write_text_atomic(out_dir / LABELS_JSON, json.dumps(description, indent=2) + "\n")
    except (OSError, RuntimeError) as error:
        raise InputError(f"Cannot write the phantom into {out_dir} ({error}); choose a writable folder.") from error
    return image_path, label_path
