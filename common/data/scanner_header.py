"""The scanner facts of a fastMRI file, read strictly from its ISMRMRD XML header.

Partitioning reads the scanner (vendor, model, field, coils, protocol); DICOM output reads the
geometry (reconstructed field of view and matrix) and the sequence timing (TE, TR, TI, flip angle).

Why not the ``ismrmrd`` package: its ``xsd.CreateFromDocument`` (1.15, xsdata bindings) is strict where
FedSense does not care and lax where it does. A header lacking a schema-required element that partitioning
never reads (``patientPosition``, ``experimentalConditions``) fails with a bare ``TypeError`` from a
dataclass constructor that names no element; any element outside that schema version (a vendor
extension, an element an older or newer converter wrote) fails the whole file; yet a non-numeric
``systemFieldStrength_T`` only raises a warning and comes back as a string. It would also add xsdata to
every site's install. This reader validates exactly the fields partitioning uses (types, ranges,
namespace), names the element in every error, ignores the rest, and refuses DTDs and entity
declarations, which no ISMRMRD header needs and which are the XML bomb vectors.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Literal, TypeVar, overload

from common.data.readers import ISMRMRD_NAMESPACE

_NS = {"ns": ISMRMRD_NAMESPACE}
_DOCTYPE = re.compile(rb"<!(DOCTYPE|ENTITY)", re.IGNORECASE)
# Vendors report the measured field (fastMRI brain: 2.89362 T, 1.494 T); studies group by nominal field.
NOMINAL_FIELDS_T = (0.35, 0.55, 1.0, 1.5, 3.0, 7.0)
_NOMINAL_TOLERANCE = 0.1


class HeaderError(ValueError):
    """A header that is not well-formed ISMRMRD XML or has an invalid value; the message names the element."""


@dataclass(frozen=True)
class ScannerHeader:
    """What partitioning and DICOM output read from an ISMRMRD header; None where the header does not say."""

    vendor: str | None
    model: str | None
    field_strength_t: float | None
    receiver_channels: int | None
    protocol: str | None
    encoded_matrix: tuple[int, int]  # (x, y): readout x phase-encode, as fastMRI's k-space (H, W)
    recon_matrix: tuple[int, int, int] | None = None  # reconSpace (x, y, z): the image grid fastMRI crops to
    recon_fov_mm: tuple[float, float, float] | None = None  # reconSpace field of view; z is the slab per slice
    echo_time_ms: float | None = None
    repetition_time_ms: float | None = None
    inversion_time_ms: float | None = None
    flip_angle_deg: float | None = None
    imaging_frequency_hz: float | None = None

    @property
    def scanner(self) -> str | None:
        """``Vendor Model`` (or whichever of the two is present): the scanner partition key."""
        parts = [p for p in (self.vendor, self.model) if p]
        return " ".join(parts) if parts else None


def nominal_field(field_t: float) -> float:
    """The nominal field strength a measured one belongs to (2.89362 -> 3.0); the value itself if none is near."""
    nearest = min(NOMINAL_FIELDS_T, key=lambda f: abs(f - field_t))
    return nearest if abs(nearest - field_t) <= _NOMINAL_TOLERANCE * nearest else round(field_t, 2)


def _text(root: ET.Element, path: str) -> str | None:
    element = root.find("./" + "/".join(f"ns:{tag}" for tag in path.split("/")), _NS)
    if element is None or element.text is None or not element.text.strip():
        return None
    return element.text.strip()


_Number = TypeVar("_Number", int, float)


@overload
def _number(root: ET.Element, path: str, kind: type[_Number], required: Literal[True]) -> _Number: ...
@overload
def _number(root: ET.Element, path: str, kind: type[_Number], required: bool) -> _Number | None: ...
def _number(root: ET.Element, path: str, kind: type[_Number], required: bool) -> _Number | None:
    text = _text(root, path)
    if text is None:
        if required:
            raise HeaderError(f"ismrmrd_header: {path}: required element is missing")
        return None
    try:
        value = kind(text)
    except ValueError:
        raise HeaderError(f"ismrmrd_header: {path}: expected {kind.__name__}, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise HeaderError(f"ismrmrd_header: {path}: must be a positive finite number, got {text!r}")
    return value


def _timing(root: ET.Element, path: str) -> float | None:
    """An optional sequence parameter (first value when the header lists several); 0 is allowed (no TI)."""
    text = _text(root, path)
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise HeaderError(f"ismrmrd_header: {path}: expected float, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise HeaderError(f"ismrmrd_header: {path}: must be a non-negative finite number, got {text!r}")
    return value


def _triple(root: ET.Element, path: str, kind: type[_Number]) -> tuple[_Number, _Number, _Number] | None:
    """An optional x/y/z element (matrixSize, fieldOfView_mm); all three axes or none."""
    if root.find("./" + "/".join(f"ns:{tag}" for tag in path.split("/")), _NS) is None:
        return None
    x, y, z = (_number(root, f"{path}/{axis}", kind, required=True) for axis in "xyz")
    return x, y, z


def parse_scanner_header(xml: bytes | str) -> ScannerHeader:
    """Parse the header; raises :class:`HeaderError` naming the offending element."""
    raw = xml.encode("utf-8") if isinstance(xml, str) else bytes(xml)
    if _DOCTYPE.search(raw):
        raise HeaderError("ismrmrd_header: <!DOCTYPE>/<!ENTITY>: refused (ISMRMRD headers need none)")
    try:
        root = ET.fromstring(raw)
    except ET.ParseError as exc:
        raise HeaderError(f"ismrmrd_header: not well-formed XML ({exc})") from None
    if root.tag != f"{{{ISMRMRD_NAMESPACE}}}ismrmrdHeader":
        raise HeaderError(
            f"ismrmrd_header: root element is {root.tag!r}; expected ismrmrdHeader in {ISMRMRD_NAMESPACE}"
        )
    system = "acquisitionSystemInformation"
    x = _number(root, "encoding/encodedSpace/matrixSize/x", int, required=True)
    y = _number(root, "encoding/encodedSpace/matrixSize/y", int, required=True)
    field = _number(root, f"{system}/systemFieldStrength_T", float, required=False)
    channels = _number(root, f"{system}/receiverChannels", int, required=False)
    return ScannerHeader(
        vendor=_text(root, f"{system}/systemVendor"),
        model=_text(root, f"{system}/systemModel"),
        field_strength_t=float(field) if field is not None else None,
        receiver_channels=int(channels) if channels is not None else None,
        protocol=_text(root, "measurementInformation/protocolName"),
        encoded_matrix=(int(x), int(y)),
        recon_matrix=_triple(root, "encoding/reconSpace/matrixSize", int),
        recon_fov_mm=_triple(root, "encoding/reconSpace/fieldOfView_mm", float),
        echo_time_ms=_timing(root, "sequenceParameters/TE"),
        repetition_time_ms=_timing(root, "sequenceParameters/TR"),
        inversion_time_ms=_timing(root, "sequenceParameters/TI"),
        flip_angle_deg=_timing(root, "sequenceParameters/flipAngle_deg"),
        imaging_frequency_hz=_timing(root, "experimentalConditions/H1resonanceFrequency_Hz"),
    )
