"""End-to-end latency of one study: Orthanc -> osteonode serve (embedded queue) -> results in Orthanc.

A real Orthanc (``/usr/sbin/Orthanc``) holds a study of three series made from
the example CT: a one-slice localizer, a bone-kernel copy and the soft-kernel
series the node must choose, both resampled to 512 x 512 x 300. Orthanc sends
the study to the node (``POST /modalities/osteonode/store``, synchronous);
the clock starts when that call returns (the study's last instance is at the
node) and stops when the node's SEG, SR, key images and PDF are all stored in
the study in Orthanc. The target of issue 11 is ``study_quiet_period_s`` + 20 s
on 2 cores. Printed: the latency, the quiet period, the analysis stage times
(``result.json``) and the rest (queue, delivery).

Usage: python bench/e2e.py [--quiet-period-s 30] [--repeats 1] [--radiomics-preset seed000]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pydicom
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests" / "integration"))
from common import EXAMPLE_CT, GRID, spacing_512  # noqa: E402
from node import NodeProcess, write_config  # noqa: E402
from services import OrthancServer, wait_for  # noqa: E402

from osteonode.ctseries import read_image, write_ct_series  # noqa: E402

RESULT_MODALITIES = {"SEG", "SR", "OT", "DOC"}


def _study(out: Path) -> list[Path]:
    """Localizer, bone-kernel copy and soft-kernel series (512 x 512 x 300) of one study; all files."""
    image = read_image(EXAMPLE_CT)
    grid = sitk.Resample(image, GRID, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(), spacing_512(image),
                         image.GetDirection(), -1024.0, sitk.sitkInt16)
    study_uid = pydicom.uid.generate_uid()
    files = []
    mid = GRID[2] // 2
    for number, name, volume, image_type, kernel in (
            (1, "Topogram", grid[:, :, mid:mid + 1], ["ORIGINAL", "PRIMARY", "LOCALIZER"], "T20f"),
            (2, "Abdomen bone B60f", grid, ["ORIGINAL", "PRIMARY", "AXIAL"], "B60f"),
            (3, "Abdomen soft B30f", grid, ["ORIGINAL", "PRIMARY", "AXIAL"], "B30f")):
        for path in write_ct_series(volume, out / str(number), study_instance_uid=study_uid, series_description=name):
            ds = pydicom.dcmread(path)
            ds.SeriesNumber, ds.ImageType, ds.ConvolutionKernel = number, image_type, kernel
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
    return files


def _results(orthanc: OrthancServer, study_id: str) -> set[str]:
    return {s["MainDicomTags"]["Modality"] for s in orthanc.series_of_study(study_id)
            if s["MainDicomTags"].get("SeriesDescription", "").startswith("osteonode")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quiet-period-s", type=float, default=30.0, help="the node's study_quiet_period_s")
    parser.add_argument("--repeats", type=int, default=1, help="studies sent one after another")
    parser.add_argument("--radiomics-preset", default="seed000", help="[analysis] radiomics_preset; '' for none")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="osteonode-e2e-"))
    orthanc = OrthancServer(work / "orthanc")
    node = None
    try:
        print("writing the study (localizer, bone and soft kernel, 512 x 512 x 300) ...", flush=True)
        files = _study(work / "ct")
        orthanc.start()
        config, port = write_config(work / "node", broker_url=None, quiet_period_s=args.quiet_period_s,
                                    destinations=[(orthanc.aet, "127.0.0.1", orthanc.dicom_port)],
                                    extra=f'[analysis]\nradiomics_preset = "{args.radiomics_preset}"\n')
        node = NodeProcess(work / "serve", config, "serve", port).start()
        orthanc.add_modality("osteonode", "OSTEONODE", "127.0.0.1", port)
        for path in files:
            reply = orthanc.upload(path)
        study_id, study_uid = reply["ParentStudy"], pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
        for repeat in range(args.repeats):
            entry = work / "node" / "outbox" / study_uid
            shutil.rmtree(entry, ignore_errors=True)
            for series in orthanc.series_of_study(study_id):  # a fresh start: the results of the last run go
                if series["MainDicomTags"]["Modality"] != "CT":
                    orthanc.delete(f"/series/{series['ID']}")
            shutil.rmtree(work / "node" / "spool" / study_uid, ignore_errors=True)
            (work / "node" / "spool" / ".jobs" / f"{study_uid}.json").unlink(missing_ok=True)
            send_start = time.monotonic()
            orthanc.store_to_modality("osteonode", study_id)
            t0 = time.monotonic()
            wait_for(lambda: _results(orthanc, study_id) >= RESULT_MODALITIES, 600, interval_s=0.2,
                     what="the results in Orthanc")
            latency = time.monotonic() - t0
            timings = json.loads((entry / "result.json").read_text())["timings_s"]
            analysis = sum(timings.values())
            target = args.quiet_period_s + 20
            print(f"run {repeat + 1}: {len(files)} instances sent in {t0 - send_start:.1f} s; "
                  f"last instance -> results in Orthanc: {latency:.1f} s "
                  f"(target <= {target:.0f} s: {'met' if latency <= target else 'NOT met'})")
            print(f"  quiet period {args.quiet_period_s:.1f} s, analysis {analysis:.1f} s "
                  f"({', '.join(f'{k} {v:.1f}' for k, v in timings.items())}), "
                  f"rest (poll, queue, delivery) {latency - args.quiet_period_s - analysis:.1f} s")
    finally:
        if node is not None:
            node.stop(timeout_s=30)
        orthanc.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
