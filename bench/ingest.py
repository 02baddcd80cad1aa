"""Ingest throughput: `osteonode serve` versus dcmtk `storescp`, same series, same sender, one run.

Sends the example CT resampled to 512 x 512 x 300 (``--grid 512``) or
458 x 379 x 269 (``--grid thin``) slices, uncompressed, with dcmtk `storescu`
(TCP_NODELAY=1) to each receiver, alternating, REPEATS times, and prints the
median slices per second of each and their ratio, and the node's CPU seconds
per 100 slices. Two more receivers take the same sends: pynetdicom's
ceiling, in this process (an SCP with the node's association settings whose
C-STORE handler answers success at once, storing nothing), and Orthanc
(``/usr/sbin/Orthanc``, ``SyncStorageArea``: each instance fsynced before
success), a C++ receiver that can refuse instances with a DIMSE status from a
Lua filter. Last, the durability floor: the median time of writing one slice
durably (``write_atomic``: write, fsync, rename, folder fsync) in the node's
spool folder, and the rate storescp would keep if each of its slices also
paid it. With ``--senders N`` the series is split over N storescu
processes sending at once (N associations; storescp then runs with --fork).
With ``--py-spy FILE`` the node's receive is sampled by py-spy during its
sends (top functions to FILE).
The node runs on the embedded queue with a long quiet period, so no analysis
competes with the receive path during the measurement.

Usage: python bench/ingest.py [--repeats 5] [--grid 512|thin] [--senders 1] [--py-spy profile.txt]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pydicom
from pynetdicom import evt

from osteonode.atomic import write_atomic
from osteonode.config import load_settings
from osteonode.ingest.scp import make_ae

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))
from common import GRIDS, median, series_512  # noqa: E402
from services import OrthancServer  # noqa: E402

ENV = {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {port}")


def send(port: int, aet: str, files: list[Path], senders: int = 1) -> float:
    """Seconds until ``senders`` storescu processes, each sending every ``senders``-th file, are done."""
    start = time.perf_counter()
    procs = [subprocess.Popen(["/usr/bin/storescu", "-aec", aet, "127.0.0.1", str(port),
                               *map(str, files[i::senders])], env=ENV, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE) for i in range(senders)]
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode(errors='replace')[-500:]}")
    return time.perf_counter() - start


def durable_write_s(folder: Path, data: bytes, repeats: int = 50) -> float:
    """Median seconds of one :func:`write_atomic` of ``data`` in ``folder``."""
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        write_atomic(folder / f"floor-{i}.dcm", data)
        times.append(time.perf_counter() - start)
    return median(times)


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rows_columns(path: Path) -> str:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return f"{ds.Columns}x{ds.Rows}"


def summarise_raw(raw: Path, top: int = 25) -> str:
    """Self and total sample counts per function of a py-spy ``--format raw`` (collapsed stacks) file."""
    self_n: Counter[str] = Counter()
    total_n: Counter[str] = Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [f for f in stack.split(";") if not f.startswith(("thread ", "process "))]
        if not frames:
            continue
        n = int(count)
        samples += n
        self_n[frames[-1]] += n
        for frame in set(frames):
            total_n[frame] += n
    lines = [f"{samples} samples (all threads, idle excluded)", "", "self %  function"]
    lines += [f"{100 * n / samples:6.1f}  {f}" for f, n in self_n.most_common(top)]
    lines += ["", "total %  function"]
    lines += [f"{100 * n / samples:6.1f}  {f}" for f, n in total_n.most_common(top)]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--grid", choices=sorted(GRIDS), default="512")
    parser.add_argument("--senders", type=int, default=1, help="storescu processes sending at once")
    parser.add_argument("--py-spy", type=Path, help="write py-spy's sampled profile of the node to this file")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="osteonode-bench-"))
    procs = []
    try:
        files = series_512(work / "ct", args.grid)
        node_dir = work / "node"
        for sub in ("spool", "outbox", "queue"):
            (node_dir / sub).mkdir(parents=True)
        node_port, scp_port = free_port(), free_port()
        config = work / "node.toml"
        config.write_text(f'bind_address = "127.0.0.1"\nport = {node_port}\n'
                          'study_quiet_period_s = 3600\nincomplete_timeout_s = 7200\n'
                          f'spool_dir = "{node_dir}/spool"\noutbox_dir = "{node_dir}/outbox"\n'
                          f'queue_dir = "{node_dir}/queue"\n[web]\nenabled = false\n')  # port 8080 may be taken
        (work / "storescp").mkdir()
        procs.append(subprocess.Popen([sys.executable, "-m", "osteonode", "--log-level", "WARNING", "serve",
                                       "--config", str(config)], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
        fork = ["--fork"] if args.senders > 1 else []
        procs.append(subprocess.Popen(["/usr/bin/storescp", *fork, "-aet", "STORESCP", "-od", str(work / "storescp"),
                                       str(scp_port)], env=ENV, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
        wait_listening(node_port)
        wait_listening(scp_port)
        orthanc = OrthancServer(work / "orthanc", extra_config={"SyncStorageArea": True}).start()
        procs.append(orthanc.proc)
        ceiling_port = free_port()
        ceiling = make_ae(load_settings(config)).start_server(
            ("127.0.0.1", ceiling_port), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda event: 0x0000)])
        node_s, scp_s, node_cpu, ceiling_s, orthanc_s = [], [], [], [], []
        spy = None
        if args.py_spy:
            spy = subprocess.Popen([str(Path(sys.executable).with_name("py-spy")), "record", "--format", "raw",
                                    "--threads", "--nonblocking", "-o", str(work / "spy.raw"),
                                    "--pid", str(procs[0].pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1)
        for _ in range(args.repeats):
            cpu0 = cpu_s(procs[0].pid)
            node_s.append(send(node_port, "OSTEONODE", files, args.senders))
            node_cpu.append(cpu_s(procs[0].pid) - cpu0)
            scp_s.append(send(scp_port, "STORESCP", files, args.senders))
            ceiling_s.append(send(ceiling_port, "OSTEONODE", files, args.senders))
            orthanc_s.append(send(orthanc.dicom_port, orthanc.aet, files, args.senders))
        if spy is not None:
            spy.send_signal(2)
            spy.wait(timeout=60)
            args.py_spy.write_text(summarise_raw(work / "spy.raw"))
        n = len(files)
        fsync_s = durable_write_s(node_dir / "spool", files[0].read_bytes())
        node_rate, scp_rate = n / median(node_s), n / median(scp_s)
        print(f"series: {n} slices of {rows_columns(files[0])} int16, uncompressed; {args.repeats} sends each "
              f"by {args.senders} storescu process(es) at once, medians")
        print(f"osteonode serve : {node_rate:7.1f} slices/s  (median {median(node_s):.2f} s)")
        print(f"dcmtk storescp  : {scp_rate:7.1f} slices/s  (median {median(scp_s):.2f} s)")
        ceiling_rate = n / median(ceiling_s)
        print(f"pynetdicom ceiling: {ceiling_rate:7.1f} slices/s  (handler answering at once; ratio to storescp "
              f"{ceiling_rate / scp_rate:.2f})")
        orthanc_rate = n / median(orthanc_s)
        print(f"Orthanc (fsync)   : {orthanc_rate:7.1f} slices/s  (ratio to storescp {orthanc_rate / scp_rate:.2f})")
        print(f"ratio osteonode/storescp: {node_rate / scp_rate:.2f}")
        floor_rate = 1 / (1 / scp_rate + fsync_s / args.senders)
        print(f"durable write of one slice: {1000 * fsync_s:.2f} ms; storescp plus it: {floor_rate:.1f} slices/s "
              f"(ratio {floor_rate / scp_rate:.2f})")
        print(f"node CPU: {100 * median(node_cpu) / n:.2f} s per 100 slices (user + system)")
        ceiling.shutdown()
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
