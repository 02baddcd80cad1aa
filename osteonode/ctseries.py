"""Write a volume as a CT Image Storage series (for the demo, the tests and the benchmarks).

The real CT shipped for development is NIfTI; PACS traffic is DICOM. This
module turns a SimpleITK image in HU into a dciodvfy-clean single-frame CT
Image Storage series (PS3.3 A.3): int16 stored values with a rescale to HU,
full Image Plane geometry in LPS, one file per slice.

It ships in the runtime package because ``osteonode demo`` (a command of the
installed node, :mod:`osteonode.demo`) converts a NIfTI CT with it before
sending the series by C-STORE; the tests and benchmarks reuse it.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from osteonode import __version__

RESCALE_INTERCEPT_HU = -1024.0


def read_image(path: Path) -> sitk.Image:
    """Read a NIfTI (or any SimpleITK-readable) CT image in HU."""
    return sitk.ReadImage(str(path))


def write_ct_series(
    image: sitk.Image,
    out_dir: Path,
    *,
    patient_name: str = "OSTEONODE^DEMO",
    patient_id: str = "OSTEO-DEMO-1",
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    series_description: str = "Abdomen 3.0 converted",
) -> list[Path]:
    """Write ``image`` as one CT Image Storage file per slice.

    Parameters
    ----------
    image : SimpleITK.Image
        3-D image indexed ``(x, y, z)``, values in HU, any direction (LPS).
    out_dir : pathlib.Path
        Folder to write ``CT_<n>.dcm`` into; created if missing.
    patient_name, patient_id : str
        Patient module values (synthetic identities only).
    study_instance_uid, series_instance_uid : str, optional
        UIDs to use; new ones are generated when omitted.
    series_description : str
        Series Description (0008,103E).

    Returns
    -------
    list of pathlib.Path
        The written files, in slice order.

    Raises
    ------
    ValueError
        If the image is not 3-D or its HU do not fit int16 after rescale.
    """
    if image.GetDimension() != 3:
        raise ValueError(f"expected a 3-D image, got {image.GetDimension()}-D")
    hu = sitk.GetArrayFromImage(image)  # (z, y, x)
    stored = np.rint(hu.astype(np.float64) - RESCALE_INTERCEPT_HU)
    if stored.min() < -32768 or stored.max() > 32767:
        raise ValueError("HU range does not fit int16 with intercept -1024")
    stored = stored.astype(np.int16)
    out_dir.mkdir(parents=True, exist_ok=True)
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    row_dir, col_dir, slice_dir = direction[:, 0], direction[:, 1], direction[:, 2]
    sx, sy, sz = image.GetSpacing()
    study_uid = study_instance_uid or generate_uid()
    series_uid = series_instance_uid or generate_uid()
    frame_uid = generate_uid()
    now = dt.datetime.now()
    paths = []
    for k in range(stored.shape[0]):
        position = np.array(image.TransformIndexToPhysicalPoint((0, 0, k)))
        ds = _slice_dataset(stored[k])
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = ""
        ds.PatientSex = ""
        ds.StudyInstanceUID = study_uid
        ds.StudyDate = now.strftime("%Y%m%d")
        ds.StudyTime = now.strftime("%H%M%S")
        ds.ReferringPhysicianName = ""
        ds.StudyID = "1"
        ds.AccessionNumber = ""
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = 2
        ds.SeriesDescription = series_description
        ds.BodyPartExamined = "ABDOMEN"
        ds.PatientPosition = "HFS"
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [f"{sy:.6f}", f"{sx:.6f}"]  # row spacing (y), column spacing (x)
        ds.SliceThickness = f"{sz:.4f}"
        ds.SliceLocation = f"{float(np.dot(position, slice_dir)):.4f}"
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = out_dir / f"CT_{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _slice_dataset(pixels: np.ndarray) -> pydicom.Dataset:
    """Return the per-slice constant modules of a CT image with ``pixels`` (y, x) int16."""
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationVersionName = f"OSTEONODE_{__version__}"[:16]
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CTImageStorage
    ds.Modality = "CT"
    ds.Manufacturer = "osteonode test-data writer"
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    ds.KVP = "120"
    ds.AcquisitionNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = f"{RESCALE_INTERCEPT_HU:g}"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter = "400"
    ds.WindowWidth = "1800"
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<i2").tobytes()
    return ds
