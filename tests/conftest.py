"""Shared test data, and the test tiers.

Tiers: a test is ``integration`` when it needs the shared real CT
(``../shared/data/ct``, never copied into the repository), a tool or service
installed from Debian packages (dcmtk, dicom3tools, Orthanc, Redis, Chromium,
poppler) or takes long. Everything under ``tests/integration`` is, and so is
any test that uses one of :data:`INTEGRATION_FIXTURES` (directly or through
another fixture); other tests that need such a tool carry
``@pytest.mark.integration`` (or a module ``pytestmark``). The fast tier is
``pytest -m "not integration"`` (README).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, XRayRadiationDoseSRStorage, generate_uid

from osteonode.ctseries import read_image, write_ct_series
from tests.ctdata import ABDOMEN_NIFTI, DATA, J2K_DIR  # noqa: F401  (DATA: imported from here by tests)

#: Fixtures that read the shared real CT or run a service: a test using one is ``integration``.
INTEGRATION_FIXTURES = frozenset({"abdomen_series", "j2k_series", "study", "refs", "volume",
                                  "redis_server", "orthanc", "storescp"})
_INTEGRATION_DIR = Path(__file__).resolve().parent / "integration"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``integration`` every test under tests/integration and every test using an integration fixture."""
    for item in items:
        if item.path.is_relative_to(_INTEGRATION_DIR) or INTEGRATION_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.integration)


#: Patient of the multi-series ``study`` fixture (synthetic identity).
STUDY_PATIENT = {"patient_name": "STUDY^TEST", "patient_id": "OSTEO-STUDY-1"}


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


def _series(image: sitk.Image, folder: Path, study_uid: str, number: int, description: str, *,
            image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL"), kernel: str = "B30f") -> list[Path]:
    """Write ``image`` as CT Image Storage with the series attributes the selection rules read."""
    paths = write_ct_series(image, folder, study_instance_uid=study_uid, series_description=description,
                            **STUDY_PATIENT)
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.SeriesNumber, ds.ImageType, ds.ConvolutionKernel = number, list(image_type), kernel
        ds.save_as(path, enforce_file_format=True)
    return paths


def _non_ct_objects(folder: Path, study_uid: str, ct: Path) -> list[Path]:
    """A dose SR and a Secondary Capture with Modality CT (a dose screen) of the same study."""
    folder.mkdir(parents=True, exist_ok=True)
    source = pydicom.dcmread(ct)
    screen = pydicom.dcmread(ct)
    screen.SOPClassUID = screen.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    screen.SOPInstanceUID = screen.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    screen.SeriesInstanceUID, screen.SeriesNumber, screen.SeriesDescription = generate_uid(), 99, "Dose screen"
    screen.ConversionType = "WSD"
    dose = pydicom.Dataset()
    dose.file_meta = pydicom.dataset.FileMetaDataset()
    dose.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dose.SOPClassUID = dose.file_meta.MediaStorageSOPClassUID = XRayRadiationDoseSRStorage
    dose.SOPInstanceUID = dose.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    dose.StudyInstanceUID, dose.SeriesInstanceUID, dose.Modality = study_uid, generate_uid(), "SR"
    dose.PatientName, dose.PatientID = source.PatientName, source.PatientID
    paths = [folder / "screen.dcm", folder / "dose.dcm"]
    screen.save_as(paths[0], enforce_file_format=True)
    dose.save_as(paths[1], enforce_file_format=True)
    return paths


@pytest.fixture(scope="session")
def study(tmp_path_factory) -> dict[str, list[Path]]:
    """The multi-series study, by role; all series share one Study Instance UID."""
    out = tmp_path_factory.mktemp("study")
    image = read_image(require_data(ABDOMEN_NIFTI))  # 3 mm, axial
    uid = generate_uid()
    thin = sitk.Resample(image, [image.GetSize()[0], image.GetSize()[1], image.GetSize()[2] * 2],
                         sitk.Transform(), sitk.sitkLinear, image.GetOrigin(),
                         (*image.GetSpacing()[:2], image.GetSpacing()[2] / 2), image.GetDirection(), -1024)
    mid = image.GetSize()[2] // 2
    series = {
        "localizer": _series(image[:, :, mid:mid + 1], out / "loc", uid, 1, "Topogram 0.6 T20f",
                             image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), kernel="T20f"),
        "soft": _series(image, out / "soft", uid, 2, "Abdomen 3.0 B30f"),
        "bone": _series(thin, out / "bone", uid, 3, "Abdomen 1.5 B60f bone", kernel="B60f"),
        "coronal": _series(sitk.PermuteAxes(image, [0, 2, 1]), out / "cor", uid, 4, "Cor MPR 3.0",
                           image_type=("DERIVED", "SECONDARY", "REFORMATTED")),
        "arterial": _series(image, out / "art", uid, 5, "Abdomen arterial 3.0 B30f"),
    }
    series["non_ct"] = _non_ct_objects(out / "other", uid, series["soft"][0])
    return series


class PKI(NamedTuple):
    """PEM files of a throw-away CA, certificates it signed, and one it did not (``tls_pki`` fixture).

    ``node``, ``peer``: for localhost and 127.0.0.1; ``elsewhere``: signed by the CA for another host name
    only; ``rogue``: self-signed.
    """

    ca: Path
    node_cert: Path
    node_key: Path
    peer_cert: Path
    peer_key: Path
    rogue_cert: Path
    rogue_key: Path
    elsewhere_cert: Path
    elsewhere_key: Path


def _issue(folder: Path, name: str, issuer_name, issuer_key, *, ca: bool = False, host: str | None = None):
    """Write ``<name>.crt`` / ``<name>.key``: an EC P-256 certificate for ``host`` or localhost and 127.0.0.1
    (valid 1 day)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name or subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        names = [x509.DNSName(host)] if host else [x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(issuer_key or key, hashes.SHA256())
    (folder / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / f"{name}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                           serialization.PrivateFormat.TraditionalOpenSSL,
                                                           serialization.NoEncryption()))
    return cert.subject, key


@pytest.fixture(scope="session")
def tls_pki(tmp_path_factory) -> PKI:
    """A CA with a node and a peer certificate (both for localhost/127.0.0.1), and a self-signed rogue one."""
    out = tmp_path_factory.mktemp("pki")
    ca_name, ca_key = _issue(out, "ca", None, None, ca=True)
    _issue(out, "node", ca_name, ca_key)
    _issue(out, "peer", ca_name, ca_key)
    _issue(out, "rogue", None, None)
    _issue(out, "elsewhere", ca_name, ca_key, host="elsewhere.invalid")
    return PKI(*(out / f for f in ("ca.crt", "node.crt", "node.key", "peer.crt", "peer.key",
                                   "rogue.crt", "rogue.key", "elsewhere.crt", "elsewhere.key")))


@pytest.fixture(scope="session")
def tiny_ct():
    """``tiny_ct(path, study_uid=None, patient_id="TINY-1")`` writes a valid 16 x 16 CT instance and returns
    ``path``."""
    return _write_tiny_ct


def _write_tiny_ct(path: Path, study_uid: str | None = None, patient_id: str = "TINY-1") -> Path:
    """Write a valid 16 x 16 CT Image Storage instance (no shared data needed) for network tests."""
    import numpy as np
    from pydicom.uid import CTImageStorage

    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid or generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality = patient_id, "TINY^CT", "CT"
    ds.Rows = ds.Columns = 16
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope = 0, 1
    ds.PixelData = np.zeros((16, 16), dtype=np.int16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path
