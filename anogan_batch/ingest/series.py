"""DICOM files into volumes: headers read without pixels, grouped, ordered, checked.

Files are grouped by SeriesInstanceUID and split by FrameOfReferenceUID, orientation, rows and
columns, pixel spacing, and acquisition / temporal position / echo number (a scout at another
orientation, a second echo, another phase each become their own volume). Within a group the
slices are ordered by their position along the slice normal (ImagePositionPatient · (row x
column direction)), falling back to InstanceNumber, then to the file name, since
InstanceNumber is often unreliable. The spacing between neighbours is checked (relative
tolerance SPACING_TOLERANCE of the median): a duplicate position or a gap starts a new
contiguous sub-volume, and each volume says what was found (`Volume.problems`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

SPACING_TOLERANCE = 1e-2
ORIENTATION_DECIMALS = 4  # direction cosines equal to this many decimals are one orientation


@dataclass(frozen=True)
class SliceHeader:
    """What grouping and ordering need of one DICOM file (no pixels read)."""

    name: str  # the file's name relative to SRC
    series: str | None = None
    frame_of_reference: str | None = None
    orientation: tuple[float, ...] | None = None  # ImageOrientationPatient: row, column
    position: tuple[float, ...] | None = None  # ImagePositionPatient
    rows: int = 0
    columns: int = 0
    pixel_spacing: tuple[float, ...] | None = None
    acquisition: Any = None
    temporal: Any = None
    echo: Any = None
    instance: int | None = None
    frames: int = 1


@dataclass
class Volume:
    """Slices of one series that form one contiguous, evenly spaced volume."""

    series: str | None
    part: int  # 0 for the first sub-volume of a group, then 1, 2... after a split
    names: list[str]  # the files in slice order
    ordered_by: str  # "position", "instance" or "name"
    spacing: float | None = None  # between slices along the normal, where positions are known
    problems: list[str] = field(default_factory=list)


def read_header(fh, name: str) -> SliceHeader:
    """One DICOM file's header (pydicom, stopping before the pixel data)."""
    import pydicom

    ds = pydicom.dcmread(fh, stop_before_pixels=True, force=True)

    def floats(tag: str, n: int) -> tuple[float, ...] | None:
        value = getattr(ds, tag, None)
        try:
            out = tuple(float(v) for v in value)
        except (TypeError, ValueError):
            return None
        return out if len(out) == n and all(np.isfinite(out)) else None

    def number(tag: str):
        value = getattr(ds, tag, None)
        try:
            return int(value) if value not in (None, "") else None
        except (TypeError, ValueError):
            return None

    return SliceHeader(
        name=name,
        series=str(getattr(ds, "SeriesInstanceUID", "") or "") or None,
        frame_of_reference=str(getattr(ds, "FrameOfReferenceUID", "") or "") or None,
        orientation=floats("ImageOrientationPatient", 6),
        position=floats("ImagePositionPatient", 3),
        rows=number("Rows") or 0,
        columns=number("Columns") or 0,
        pixel_spacing=floats("PixelSpacing", 2),
        acquisition=number("AcquisitionNumber"),
        temporal=number("TemporalPositionIdentifier"),
        echo=number("EchoNumbers"),
        instance=number("InstanceNumber"),
        frames=number("NumberOfFrames") or 1,
    )


def group(headers: list[SliceHeader]) -> list[Volume]:
    """The volumes of a set of DICOM headers, in a stable order (series, then keys)."""
    groups: dict[tuple, list[SliceHeader]] = {}
    for h in headers:
        groups.setdefault(_key(h), []).append(h)
    volumes = []
    for key in sorted(groups, key=repr):
        volumes.extend(_order(groups[key]))
    return volumes


def _key(h: SliceHeader) -> tuple:
    def rounded(values, decimals):
        return None if values is None else tuple(round(v, decimals) for v in values)

    return (
        h.series, h.frame_of_reference, rounded(h.orientation, ORIENTATION_DECIMALS),
        h.rows, h.columns, rounded(h.pixel_spacing, 6), h.acquisition, h.temporal, h.echo,
    )  # fmt: skip


def _order(slices: list[SliceHeader]) -> list[Volume]:
    """One group's slices in order, split where the spacing breaks."""
    series = slices[0].series
    if len(slices) > 1 and all(h.position and h.orientation for h in slices):
        row, col = np.array(slices[0].orientation[:3]), np.array(slices[0].orientation[3:])
        normal = np.cross(row, col)
        depth = {h.name: float(np.dot(h.position, normal)) for h in slices}
        ordered = sorted(slices, key=lambda h: (depth[h.name], h.name))
        return _split(series, ordered, [depth[h.name] for h in ordered])
    if all(h.instance is not None for h in slices):
        ordered = sorted(slices, key=lambda h: (h.instance, h.name))
        how = "instance"
    else:
        ordered = sorted(slices, key=lambda h: h.name)
        how = "name"
    return [Volume(series, 0, [h.name for h in ordered], how)]


def _split(series, ordered: list[SliceHeader], depth: list[float]) -> list[Volume]:
    """Ordered slices with their depths -> contiguous, evenly spaced sub-volumes."""
    steps = np.diff(depth)
    positive = steps[steps > 1e-6]
    spacing = float(np.median(positive)) if len(positive) else None
    volumes = [Volume(series, 0, [ordered[0].name], "position", spacing)]
    for h, step in zip(ordered[1:], steps, strict=True):
        current = volumes[-1]
        if spacing is None or abs(step - spacing) <= SPACING_TOLERANCE * spacing:
            current.names.append(h.name)
            continue
        if step <= SPACING_TOLERANCE * spacing:
            why = f"duplicate position at {h.name} (a slice at the same place)"
        else:
            why = f"gap of {step:.3g} before {h.name} (spacing {spacing:.3g})"
        current.problems.append(why)
        volumes.append(Volume(series, len(volumes), [h.name], "position", spacing, [why]))
    return volumes
