"""Reading images with clear errors, and writing them whole or not at all."""

from __future__ import annotations

import math
import os
import re
import struct
import zlib
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np
import SimpleITK as sitk

from .atomic import atomic_destination, check_output_path
from .errors import InputError
from .transforms import bounding_box, box_to_vtk_extent

PathLike = Union[str, "os.PathLike[str]"]

_GZIP_WINDOW = 16 + zlib.MAX_WBITS  # zlib's setting for data with a gzip header and trailer
_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK_BYTES = 1 << 22
_ITK_ERROR = "ITK ERROR:"
# DICOM tags of a slice's geometry, and how far slices may stray from an even stack before it is refused.
_ORIENTATION_TAG, _POSITION_TAG, _THICKNESS_TAG = "0020|0037", "0020|0032", "0018|0050"
_DESCRIPTION_TAG = "0008|103e"
_SLOPE_TAG, _INTERCEPT_TAG = "0028|1053", "0028|1052"
_DICOM_ORIENTATION_TOLERANCE = 1e-3
_DICOM_STEP_TOLERANCE = 0.05  # of the median step between slices
_DICOM_POSITION_TOLERANCE_MM = 0.1  # two slices this close lie at one place; a slice this far sideways, tilted
# NIfTI headers by their size: (header bytes, dim (format, offset), datatype (format, offset), bitpix (format,
# offset), vox_offset (format, offset)); NIfTI-1 keeps int16 dims and a float32 offset, NIfTI-2 int64 dims and an
# int64 offset.
_NIFTI_LAYOUTS = {
    348: (("8h", 40), ("h", 70), ("h", 72), ("f", 108)),
    540: (("8q", 16), ("h", 12), ("h", 14), ("q", 168)),
}
# Bits per voxel of each NIfTI datatype code: the reader (nifti1_io, in ITK) sizes the voxels by the datatype and
# ignores bitpix, which some writers get wrong.
_NIFTI_DATATYPE_BITS = {
    1: 1, 2: 8, 4: 16, 8: 32, 16: 32, 32: 64, 64: 64, 128: 24, 256: 8, 512: 16, 768: 32, 1024: 64, 1280: 64,
    1536: 128, 1792: 128, 2048: 256, 2304: 32,
}  # fmt: skip
# Formats whose header names a second data file: a temporary name would end up inside the header.
_TWO_FILE_SUFFIXES = (".mhd", ".hdr", ".img", ".nhdr")
# Single-file formats that keep a 3-D volume with its geometry (a .png or .tif would keep one 2-D slice).
_VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".seg.nrrd", ".mha")
# Segment colours of a .seg.nrrd written here (RGB 0-1), in turn: tissue green, then others easy to tell apart.
_SEGMENT_COLORS = ((0.5, 0.68, 0.5), (0.9, 0.6, 0.2), (0.3, 0.5, 0.9), (0.85, 0.3, 0.3), (0.7, 0.4, 0.8))


def check_image_exists(path: PathLike) -> Path:
    location = Path(path)
    if not _exists(location):
        raise InputError(f"Image {location} does not exist; check the path.")
    return location


def _exists(path: Path) -> bool:
    """Path.exists, with a path that cannot be looked at (a name too long, a folder it may not enter) as an
    InputError: before Python 3.13 Path.exists raises OSError there, which would stop a whole batch."""
    try:
        return path.exists()
    except OSError as error:
        raise InputError(f"Cannot look at {path} ({error.strerror}); check the path and its permissions.") from error


def read_image(path: PathLike) -> sitk.Image:
    """Read an image file (NIfTI, NRRD, MHA, ...) or a folder holding one DICOM series."""
    location = check_image_exists(path)
    try:
        if location.is_dir():
            return _read_dicom_series(location)
        _check_complete(location)
        image = _without_a_lone_frame(sitk.ReadImage(str(location)))
        if image.GetDimension() == 3 and image.GetSize()[2] == 1 and _is_dicom(location):
            _refuse_one_slice_of_a_series(location)
            _give_slice_its_thickness(image, _dicom_header(str(location)))
        return image
    except RuntimeError as error:
        reason = _first_line(error)
        if _is_gzip_named_otherwise(location):
            raise InputError(
                f"Could not read image {location} ({reason}): it is gzip-compressed but its name does not end in "
                f".gz; rename it (e.g. {location.name}.gz for a NIfTI)."
            ) from error
        raise InputError(
            f"Could not read image {location} ({reason}); give a whole NIfTI, NRRD, MHA or other ITK image file "
            "with a valid header, or a DICOM folder."
        ) from error


def _is_gzip_named_otherwise(location: Path) -> bool:
    """ITK picks its reader by the name: a compressed .nii is not recognised at all."""
    if location.name.lower().endswith(".gz"):
        return False
    with location.open("rb") as stream:
        return stream.read(len(_GZIP_MAGIC)) == _GZIP_MAGIC


def _without_a_lone_frame(image: sitk.Image) -> sitk.Image:
    """A 4-D image of one frame (one time point) as the 3-D volume it is; ITK drops that axis itself in NIfTI
    only."""
    size = image.GetSize()
    if image.GetDimension() == 4 and size[3] == 1:
        return sitk.Extract(image, [*size[:3], 0], [0, 0, 0, 0])
    return image


def _check_complete(location: Path) -> None:
    """ITK reads a cut-off NIfTI file (.nii, or the .img of a .hdr/.img pair given by either name, gzipped or not
    whatever its name says) or a cut-off .gz file without complaint, the missing voxels as zeros; a NIfTI header
    says how many bytes its voxels take."""
    name = location.name.lower()
    base = name[:-3] if name.endswith(".gz") else name
    if base.endswith(".nii"):
        header_file, data_file = location, location
    elif base.endswith(".hdr"):
        header_file, data_file = location, _pair_file(location, ".img")
    elif base.endswith(".img"):
        header_file, data_file = _pair_file(location, ".hdr"), location
    else:
        if name.endswith(".gz"):
            _file_content(location)  # the gzip stream must be whole
        return
    if header_file is None or data_file is None:
        return  # ITK names the missing file
    start, size, compressed = _file_content(data_file)
    header = start if header_file == data_file else _file_content(header_file)[0]
    _check_nifti_size(data_file, _nifti_data_end(header), size, "bytes once decompressed" if compressed else "bytes")


def _pair_file(path: Path, extension: str) -> Optional[Path]:
    """The other file of a .hdr/.img pair where NIfTI's reader looks for it (same stem, either case, gzipped or
    not), or None when there is none."""
    name = path.name[:-3] if path.name.lower().endswith(".gz") else path.name
    stem = name[:-4]  # without its own .hdr or .img
    for candidate in (stem + ext + gz for ext in (extension, extension.upper()) for gz in ("", ".gz", ".GZ")):
        if (path.parent / candidate).exists():
            return path.parent / candidate
    return None


def _file_content(path: Path) -> tuple[bytes, int, bool]:
    """(first bytes, size, compressed) of a file's content: a gzip file (by its magic bytes, not its name) is
    decompressed piece by piece and thrown away, to bound memory, and must be whole; what follows the first gzip
    member (rare in images) is left to ITK."""
    with path.open("rb") as stream:
        start = stream.read(max(_NIFTI_LAYOUTS))
        if not start.startswith(_GZIP_MAGIC):
            return start, path.stat().st_size, False
        stream.seek(0)
        decompressor = zlib.decompressobj(wbits=_GZIP_WINDOW)
        start, size = b"", 0
        try:
            while not decompressor.eof and (chunk := stream.read(_CHUNK_BYTES)):
                while chunk and not decompressor.eof:
                    data = decompressor.decompress(chunk, _CHUNK_BYTES)
                    start, size = start + data[: max(_NIFTI_LAYOUTS) - len(start)], size + len(data)
                    chunk = decompressor.unconsumed_tail
        except zlib.error as error:
            raise InputError(f"Image {path} is damaged ({error}); copy or export it again.") from error
    if not decompressor.eof:
        raise InputError(f"Image {path} is cut off (its compressed data end early); copy or download it again.")
    return start, size, True


def _check_nifti_size(path: Path, expected: Optional[int], size: int, unit: str = "bytes") -> None:
    """A header this cannot make sense of (expected None) is left to ITK."""
    if expected is not None and size < expected:
        raise InputError(
            f"Image {path} is cut off ({size} {unit}, its header needs {expected}); copy or export it again."
        )


def _nifti_data_end(header: bytes) -> Optional[int]:
    """The byte where a NIfTI file's voxel data end, from its first bytes, or None when they are no NIfTI header.
    For a .hdr/.img pair the offset counts in the .img file."""
    for order in "<>":
        size = struct.unpack_from(order + "i", header)[0] if len(header) >= 4 else None
        layout = _NIFTI_LAYOUTS.get(size)
        if layout is None or len(header) < size:
            continue
        (dim_format, dim_at), (type_format, type_at), (bitpix_format, bitpix_at), (offset_format, offset_at) = layout
        dims = struct.unpack_from(order + dim_format, header, dim_at)
        datatype = struct.unpack_from(order + type_format, header, type_at)[0]
        bitpix = _NIFTI_DATATYPE_BITS.get(datatype) or struct.unpack_from(order + bitpix_format, header, bitpix_at)[0]
        offset = struct.unpack_from(order + offset_format, header, offset_at)[0]
        if not 1 <= dims[0] <= 7 or bitpix <= 0 or not math.isfinite(offset) or min(dims[1 : dims[0] + 1]) < 0:
            return None
        return int(offset) + math.prod(dims[1 : dims[0] + 1]) * bitpix // 8
    return None


def _read_dicom_series(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        below = _first_series_folder_below(folder)
        hint = f"{below} does: give that folder" if below else "give an image file or a DICOM folder"
        raise InputError(f"Folder {folder} holds no DICOM series; {hint}.")
    if len(series) > 1:
        listed = "; ".join(_describe_series(reader, folder, uid) for uid in series)
        raise InputError(f"Folder {folder} holds {len(series)} DICOM series ({listed}); put one series per folder.")
    files = reader.GetGDCMSeriesFileNames(str(folder), series[0])
    headers = [_dicom_header(file) for file in files]
    _check_slice_geometry(folder, files, [_slice_header(header) for header in headers])
    if _rescale_varies(headers):
        # ITK takes the voxel type from the first slice: a later slice's larger Rescale Slope (as in PET) would
        # wrap around in it.
        reader.SetOutputPixelType(sitk.sitkFloat32)
    reader.SetFileNames(files)
    image = reader.Execute()
    if image.GetSize()[2] == 1:
        _give_slice_its_thickness(image, headers[0])
    return image


def _is_dicom(file: Path) -> bool:
    return sitk.ImageFileReader.GetImageIOFromFileName(str(file)) == "GDCMImageIO"


def _give_slice_its_thickness(image: sitk.Image, header: Optional[sitk.ImageFileReader]) -> None:
    """ITK gives a lone DICOM slice 1 mm along its normal, whatever its Slice Thickness says."""
    thickness = _slice_thickness(header) if header is not None else None
    if thickness:
        image.SetSpacing((*image.GetSpacing()[:2], thickness))


def _refuse_one_slice_of_a_series(file: Path) -> None:
    """A DICOM file given alone is read as one slice: refuse it when it belongs to a series of more."""
    resolved = file.resolve()
    folder = resolved.parent
    for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)):
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)
        if len(files) > 1 and any(Path(name).resolve() == resolved for name in files):
            raise InputError(f"{file} is one slice of a {len(files)}-slice DICOM series; give its folder, {folder}.")


def _describe_series(reader: sitk.ImageSeriesReader, folder: Path, uid: str) -> str:
    """'<Series Description or UID>: N files' for the message that lists a folder's series."""
    files = reader.GetGDCMSeriesFileNames(str(folder), uid)
    header = _dicom_header(files[0])
    has_description = header is not None and header.HasMetaDataKey(_DESCRIPTION_TAG)
    description = header.GetMetaData(_DESCRIPTION_TAG).strip() if has_description else ""
    return f"{description or uid}: {len(files)} file{'s' if len(files) != 1 else ''}"


def _first_series_folder_below(folder: Path, depth: int = 3) -> Optional[Path]:
    """The first sub-folder (breadth first, at most `depth` levels down) holding a DICOM series, as exports of
    DICOMDIR media nest them (DICOM/S0001/...)."""
    level = [folder]
    for _ in range(depth):
        children: list[Path] = []
        for parent in level:
            try:
                children += [child for child in parent.iterdir() if child.is_dir()]
            except OSError:  # a sub-folder it may not read is no place to look
                continue
        level = sorted(children)
        for child in level:
            if sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(child)):
                return child
    return None


def _check_slice_geometry(
    folder: Path, files: Sequence[str], headers: Sequence[Optional[tuple[np.ndarray, np.ndarray]]]
) -> None:
    """ITK stacks a series' slices at even steps along the first slice's normal; refuse a series where that would
    put slices in the wrong place (a missing or damaged slice, uneven steps, a gantry tilt, a localizer of another
    orientation). Slices without position tags are left to ITK."""
    if any(header is None for header in headers):
        return
    orientation, _ = headers[len(headers) // 2]  # a middle slice: not a stray localizer at either end
    for file, (other, _) in zip(files, headers):
        if not np.allclose(other, orientation, atol=_DICOM_ORIENTATION_TOLERANCE):
            raise InputError(
                f"{file} lies in another orientation than the rest of the series in {folder} (a localizer?); "
                "move it out of the folder."
            )
    normal = np.cross(orientation[:3], orientation[3:])
    positions = np.array([position for _, position in headers])
    depths = positions @ normal
    steps = np.diff(depths)
    if len(steps) and np.abs(steps).min() < _DICOM_POSITION_TOLERANCE_MM:
        raise InputError(
            f"Two slices of {folder} lie at the same place (several echoes, phases or times in one series); "
            "put each volume's slices in a folder of their own."
        )
    if len(steps) and (np.abs(steps - np.median(steps)).max() > _DICOM_STEP_TOLERANCE * abs(np.median(steps))):
        raise InputError(
            f"The slices of {folder} are not evenly spaced (steps from {steps.min():.3g} to {steps.max():.3g} mm): a "
            "slice is missing or damaged, or the series mixes spacings; export the whole series again, or convert "
            "it with a tool that resamples it (e.g. 3D Slicer's DICOM import)."
        )
    drift = positions - np.outer(depths, normal)
    if np.abs(drift - drift[0]).max() > _DICOM_POSITION_TOLERANCE_MM:
        raise InputError(
            f"The slices of {folder} are shifted sideways from one to the next (a gantry tilt): stacking them "
            "straight would misplace them; correct the tilt first (e.g. 3D Slicer's DICOM import with acquisition "
            "geometry regularization, or dcm2niix)."
        )


def _rescale_varies(headers: Sequence[Optional[sitk.ImageFileReader]]) -> bool:
    """Whether the slices' Rescale Slope or Intercept differ, as written ('1' and '1.0' count as different: reading
    such a series as float32 costs memory, not values)."""
    rescales = {
        tuple(
            header.GetMetaData(tag).strip() if header.HasMetaDataKey(tag) else ""
            for tag in (_SLOPE_TAG, _INTERCEPT_TAG)
        )
        for header in headers
        if header is not None
    }
    return len(rescales) > 1


def _slice_header(reader: Optional[sitk.ImageFileReader]) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """(orientation (6,), position (3,)) of one DICOM header, or None without those tags."""
    if reader is None:
        return None
    try:
        orientation = [float(v) for v in reader.GetMetaData(_ORIENTATION_TAG).split("\\")]
        position = [float(v) for v in reader.GetMetaData(_POSITION_TAG).split("\\")]
    except (RuntimeError, ValueError):
        return None
    if len(orientation) != 6 or len(position) != 3:
        return None
    return np.array(orientation), np.array(position)


def _slice_thickness(reader: sitk.ImageFileReader) -> Optional[float]:
    """A DICOM header's Slice Thickness in mm, or None when it is missing or no positive number."""
    try:
        thickness = float(reader.GetMetaData(_THICKNESS_TAG)) if reader.HasMetaDataKey(_THICKNESS_TAG) else None
    except ValueError:
        return None
    return thickness if thickness and thickness > 0 else None


def _dicom_header(file: str) -> Optional[sitk.ImageFileReader]:
    """A reader holding the file's header (its voxels are not read), or None when the header cannot be read."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(file)
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    return reader


def _first_line(error: Exception) -> str:
    """The reason an ITK error gives: its 'ITK ERROR' line without the class prefix, else the last plain line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if _ITK_ERROR in line:
            reason = re.sub(r"^\s*\w+\(0x[0-9a-fA-F]+\):\s*", "", line.split(_ITK_ERROR, 1)[1]).strip()
            if reason:
                return reason
    meaningful = [line for line in lines if "Exception" not in line and not line.startswith("/")]
    return (meaningful or lines or ["unknown error"])[-1]


def image_suffix(path: PathLike) -> str:
    """The file-type suffix SimpleITK dispatches on, e.g. '.nii.gz', '.seg.nrrd', '.mha'; none for a name whose
    last part is a number (a DICOM file named by its UID, 1.2.840.113619.2.55.5, or scan.001)."""
    suffixes = Path(path).suffixes
    if not suffixes or suffixes[-1][1:].isdigit():
        return ""
    if suffixes[-1].lower() == ".gz" and len(suffixes) > 1:
        return "".join(suffixes[-2:])
    if len(suffixes) > 1 and suffixes[-2].lower() == ".seg":
        return "".join(suffixes[-2:])
    return suffixes[-1]


def image_stem(path: PathLike) -> str:
    """A file's name without its image extension ('ct.v1' for ct.v1.nii.gz); a folder's whole name (a DICOM
    series folder has no extension, whatever dots its name has)."""
    path = Path(path)
    try:
        is_folder = path.is_dir()
    except OSError:  # a path it cannot look at (before Python 3.13): named as a file; reading it says why
        is_folder = False
    if is_folder:
        return path.name
    return path.name[: len(path.name) - len(image_suffix(path))] or path.name


def check_image_output(path: PathLike, inputs: Iterable[PathLike] = (), overwrite: bool = False) -> Path:
    """A volume output path checked before any work starts: a single-file format that keeps a 3-D volume
    and its geometry, and a write that loses nothing (see `check_output_path`)."""
    suffix = _writable_suffix(Path(path))
    if suffix.lower() not in _VOLUME_SUFFIXES:
        raise InputError(
            f"Output {path} is not a volume format: {suffix} would keep at most one 2-D slice, without the "
            f"volume's geometry; use one of {', '.join(_VOLUME_SUFFIXES)}."
        )
    try:
        return check_output_path(path, inputs, overwrite)
    except OSError as error:  # a name too long, a folder it may not enter: that output's problem, not a crash
        raise InputError(f"Cannot write {path} ({error.strerror}); check the path and its permissions.") from error


def _writable_suffix(target: Path) -> str:
    suffix = image_suffix(target)
    if not suffix:
        raise InputError(f"Output path {target} has no file extension; use e.g. .nii.gz, .nrrd or .mha.")
    if suffix != suffix.lower():  # ITK reads .MHA or .Nii.gz as no format: the mask could not be read back
        raise InputError(f"Output path {target} has the extension {suffix}; write it in lower case ({suffix.lower()}).")
    if suffix.lower() in _TWO_FILE_SUFFIXES:
        raise InputError(f"Output format {suffix} stores two files and cannot be written atomically; use .nii.gz.")
    return suffix


def slicer_segmentation_fields(array_kji: np.ndarray, name: str) -> dict[str, str]:
    """Header fields that make 3D Slicer load a .seg.nrrd as a segmentation with a named, coloured segment per
    label value (without them it loads as a plain label volume with generated names, and an empty mask as no
    segment at all). An empty mask keeps one empty segment of value 1; `name` names a lone value-1 segment,
    other values are named '<name> <value>'. Keys and formats as vtkMRMLSegmentationStorageNode reads them."""
    array = np.asarray(array_kji)
    present = np.unique(array)
    if not np.array_equal(present, np.round(present)):  # int() would file 0.5 under label 0, the background
        raise InputError(
            f"A .seg.nrrd keeps whole label values; the mask {name} holds fractions such as "
            f"{present[present != np.round(present)][0]:g}: threshold or round it first, or write it as .nii.gz."
        )
    values = [int(value) for value in present if value != 0] or [1]
    fields = {
        "Segmentation_MasterRepresentation": "Binary labelmap",
        "Segmentation_ContainedRepresentationNames": "Binary labelmap|",
        "Segmentation_ReferenceImageExtentOffset": "0 0 0",
    }
    for index, value in enumerate(values):
        color = _SEGMENT_COLORS[index % len(_SEGMENT_COLORS)]
        segment = {
            "ID": f"Segment_{value}",
            "Name": name if values == [1] else f"{name} {value}",
            "NameAutoGenerated": "0",
            "Color": " ".join(f"{channel:g}" for channel in color),
            "ColorAutoGenerated": "0",
            "Layer": "0",
            "LabelValue": str(value),
            "Extent": _extent_ijk(array == value),
        }
        fields.update({f"Segment{index}_{key}": text for key, text in segment.items()})
    return fields


def _extent_ijk(mask_kji: np.ndarray) -> str:
    """'i0 i1 j0 j1 k0 k1', the voxel bounds of a mask (VTK extent order); '0 -1 0 -1 0 -1' when it is empty."""
    box = bounding_box(mask_kji)
    return " ".join(str(bound) for bound in (box_to_vtk_extent(box) if box is not None else (0, -1) * 3))


def write_image_atomic(image: sitk.Image, path: PathLike, overwrite: bool = True) -> Path:
    """Write `image` to `path` through a temporary file in the same folder, then rename it into place,
    so readers never see a half-written file; the temporary file is removed if writing fails. Unless
    `overwrite`, a file at `path` is never replaced (see `atomic_destination`)."""
    target = Path(path)
    suffix = _writable_suffix(target)
    try:
        with atomic_destination(target, suffix, replace=overwrite) as temporary:
            sitk.WriteImage(image, str(temporary), True)
            _check_written(image, temporary, target)
    except (RuntimeError, OSError) as error:
        reason = _first_line(error)
        raise InputError(f"Could not write {target} ({reason}); check the folder and the format.") from error
    return target


def _check_written(image: sitk.Image, written: Path, target: Path) -> None:
    """ITK's NIfTI writer (and its NRRD writer on a full disk) reports a short write on the console at most and
    returns as if all went well: the file is flushed to disk and read back before it may replace anything."""
    with written.open("rb+") as stream:  # writable: Windows flushes only a handle opened for writing
        os.fsync(stream.fileno())
    try:
        back = read_image(written)
        whole = back.GetSize() == image.GetSize() and back.GetPixelID() == image.GetPixelID()
        if whole:
            read_back, original = sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(image)
            # Float voxels are compared where finite: NaN != NaN, and ITK's NIfTI reader gives NaN and infinite
            # voxels back as 0; a float image holding them is written whole all the same.
            kept = np.isfinite(original) if original.dtype.kind == "f" else Ellipsis
            whole = np.array_equal(read_back[kept], original[kept])
    except InputError:
        whole = False
    if not whole:
        raise InputError(
            f"Could not write {target} whole (is the disk full, or a file-size limit reached?); free some space or "
            "choose another folder. Nothing was replaced."
        )
