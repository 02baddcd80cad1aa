"""Shared test data: the real CT from ../shared/data/ct (never copied into the repo)."""

from __future__ import annotations

import os
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from osteonode.ctseries import read_image, write_ct_series

DATA = Path(os.environ.get("OSTEONODE_TEST_DATA",
                           Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ct"))
ABDOMEN_NIFTI = DATA / "totalseg-example-abdomen" / "example_ct.nii.gz"
J2K_DIR = DATA / "totalseg-example-dicom" / "dicom"


def require_data(path: Path) -> Path:
    """Fail (not skip) when the shared test data is missing: CI must have it."""
    if not path.exists():
        pytest.fail(f"test data missing: {path} (expected ../shared/data/ct beside the repository)")
    return path


@pytest.fixture(scope="session")
def abdomen_series(tmp_path_factory) -> list[Path]:
    """The real abdominal CT as a CT Image Storage series (112 slices, 3 mm, int16 + rescale)."""
    out = tmp_path_factory.mktemp("abdomen_ct")
    return write_ct_series(read_image(require_data(ABDOMEN_NIFTI)), out)


@pytest.fixture(scope="session")
def j2k_series(tmp_path_factory) -> list[Path]:
    """The real JPEG 2000 lossless series (T11-T12), with the empty UIDs filled in.

    The files are heavily de-identified: SOP Class/Instance, Study and Series
    UIDs and the patient identity are empty, so a sender must fill them in.
    Pixel data stay encapsulated JPEG 2000 as received.
    """
    out = tmp_path_factory.mktemp("j2k_ct")
    study, series = generate_uid(), generate_uid()
    paths = []
    for i, src in enumerate(sorted(require_data(J2K_DIR).iterdir())):
        ds = pydicom.dcmread(src)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.PatientName, ds.PatientID = "J2K^TEST", "J2K-1"
        ds.InstanceNumber = i + 1
        path = out / f"CT_{i + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def recompress_series(files: list[Path], out_dir: Path, transfer_syntax: str) -> list[Path]:
    """Copy a series into ``out_dir`` re-encoded (lossless) in ``transfer_syntax`` with new SOP Instance UIDs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    series_uid, paths = generate_uid(), []
    for path in files:
        ds = pydicom.dcmread(path)
        ds.compress(transfer_syntax)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        paths.append(out_dir / path.name)
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths
