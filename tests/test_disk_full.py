"""A full disk while saving: an ``OSError`` with ``errno.ENOSPC`` naming the file and saying "no space left on
device" (not torch's ``RuntimeError: [enforce fail at inline_container.cc]``), the previous file intact, no
temporary file left: for checkpoints (:class:`tasks.checkpoint.AtomicCheckpointIO`) and every output written
through :func:`vggbackbone.utils.atomic_path`.

Tested for real where the test can mount a small tmpfs without root (a user and mount namespace,
``unshare -rm``): the disk really fills up. Where it cannot (a container without user namespaces), that
test is skipped and the other one still runs: torch really writes into ``/dev/full`` (the kernel's always-full
device) and the probe :func:`atomic_path` makes to learn why torch failed really writes there too, so the
errors are the kernel's, only the file they go to is swapped.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tasks.checkpoint import AtomicCheckpointIO
from vggbackbone import utils
from vggbackbone.utils import atomic_path

REPO = Path(__file__).resolve().parents[1]

#: run in a process that sees a 256 KiB tmpfs at argv[1]: save a small checkpoint, then one that does not fit
SCRIPT = textwrap.dedent(
    """
    import errno, json, os, sys
    from pathlib import Path
    import numpy as np
    import torch
    from tasks.checkpoint import AtomicCheckpointIO
    from tasks.reporting import write_json
    from vggbackbone.utils import atomic_write

    folder = Path(sys.argv[1])
    last = folder / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.zeros(10)}, "epoch": 0}, last)
    before = last.read_bytes()
    out = {}
    try:
        io.save_checkpoint({"state_dict": {"w": torch.zeros(200_000)}, "epoch": 1}, last)
    except OSError as e:
        out["ckpt"] = [e.errno, str(e), e.filename]
    out["ckpt_kept"] = last.read_bytes() == before
    try:
        write_json(folder / "val_metrics.json", {"x": list(range(100_000))})
    except OSError as e:
        out["json"] = [e.errno, str(e), e.filename]
    try:
        with atomic_write(folder / "emb.npy") as f:
            np.save(f, np.zeros(100_000))
    except OSError as e:
        out["npy"] = [e.errno, str(e), e.filename]
    out["left"] = sorted(os.listdir(folder))
    print(json.dumps(out))
    """
)


def _can_mount_tmpfs(folder: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    cmd = ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {folder}"]
    return subprocess.run(cmd, capture_output=True).returncode == 0


def test_a_full_disk_names_the_checkpoint_and_keeps_the_previous_one(tmp_path: Path) -> None:
    """Real: a 256 KiB tmpfs, mounted in a user namespace, fills up while saving."""
    import json

    folder = tmp_path / "small"
    folder.mkdir()
    if not _can_mount_tmpfs(folder):
        pytest.skip("cannot mount a tmpfs here (no unprivileged user namespaces); the /dev/full test covers it")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    script = tmp_path / "fill.py"
    script.write_text(SCRIPT)
    mount = f"mount -t tmpfs -o size=256k tmpfs {folder} && exec {sys.executable} {script} {folder}"
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", mount], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for what, name in (("ckpt", "last.ckpt"), ("json", "val_metrics.json"), ("npy", "emb.npy")):
        code, message, filename = out[what]
        assert code == errno.ENOSPC, out
        assert filename == str(folder / name)
        assert f"no space left on device writing {folder / name} (" in message
        assert "bytes free on the file system of" in message
    assert out["ckpt_kept"]  # the previous last.ckpt, byte for byte
    assert out["left"] == ["last.ckpt"]  # no temporary file, no partial output


def test_torchs_short_write_error_becomes_enospc_naming_the_file(tmp_path: Path, monkeypatch) -> None:
    """Everywhere: torch writes into /dev/full (its real error: ``enforce fail at inline_container.cc``, no
    errno), and the probe write that asks the file system why goes to /dev/full as well (a real ENOSPC)."""
    last = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.zeros(10)}}, last)
    before = last.read_bytes()
    real_save, real_open = torch.save, os.open
    temps: list[str] = []

    def save_to_full_disk(obj, f, *args, **kwargs):
        temps.append(str(f))
        real_save(obj, "/dev/full", *args, **kwargs)  # raises torch's own RuntimeError

    def open_full_for_the_temp(path, flags, *args):
        return real_open("/dev/full", os.O_WRONLY) if str(path) in temps else real_open(path, flags, *args)

    monkeypatch.setattr(torch, "save", save_to_full_disk)
    monkeypatch.setattr(utils.os, "open", open_full_for_the_temp)
    with pytest.raises(OSError) as err:
        io.save_checkpoint({"state_dict": {"w": torch.zeros(100_000)}}, last)
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(last)
    assert f"no space left on device writing {last} (" in str(err.value)
    assert isinstance(err.value.__cause__, RuntimeError) and "inline_container" in str(err.value.__cause__)
    assert last.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_other_write_errors_are_left_as_they_are(tmp_path: Path) -> None:
    """Not every failure is a full disk: an error of the writer itself passes through unchanged."""
    with pytest.raises(ValueError, match="not a disk problem"), atomic_path(tmp_path / "x.json"):
        raise ValueError("not a disk problem")
    assert list(tmp_path.iterdir()) == []
