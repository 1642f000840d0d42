"""Two nodes on one machine, launched the way clusters launch them: ``torchrun`` and SLURM.

Each "node" is a separate launch with one CPU process (gloo over loopback), started exactly as a
cluster starts it: ``torchrun --nnodes 2 --node-rank i`` once per node (Lightning detects
``TorchElasticEnvironment``), or the program itself once per task with the variables ``srun``
sets (Lightning detects ``SLURMEnvironment``; no ``srun`` needed). The CLI runs with
``--trainer.num_nodes 2 --trainer.devices 1``.

Every node runs in its own, initially empty, working directory and the runs write their outputs to
paths relative to it (the defaults, ``runs/<task>/...``): anything a process other than global
rank 0 wrote would appear in another node's folder, and anything rank 1 needed from rank 0's
output folder would be missing. Inputs (data, checkpoints, images) are shared absolute paths, as on
a cluster's shared file system; so is the output of ``extract``, whose shards every rank writes
beside it. Every launch is bounded in time (the whole process group is killed on timeout), ports
are picked free on 127.0.0.1, nothing leaves the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_configs import REPO, fasterrcnn_fpn_model, quick_trainer, shapes_data, write_config

import tasks.reid  # noqa: F401 (registers the hyper-parameter dataclasses as safe globals)
from tasks.checkpoint import read_checkpoint

TIMEOUT_S = 300  # per launch; a hang (a rank waiting for a collective that never comes) fails, not blocks
NODE_FLAGS = ("--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.num_nodes", "2")
DDP = ("--trainer.strategy", "ddp")
# what the launchers set: never inherited from the environment the tests run in
LAUNCHER_VARS = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")

pytestmark = pytest.mark.slow


# ---------------------------------------------------------------------------- launching
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in LAUNCHER_VARS and not k.startswith(("SLURM_", "TORCHELASTIC_", "PL_", "OMPI_", "PMI_"))
    }
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"  # the same thread count in every process: bitwise-equal results
    return env | extra


class Launch:
    """Processes started together (one per node), waited for together, killed together on timeout."""

    def __init__(self, name: str, logs: Path) -> None:
        self.name, self.logs = name, logs
        self.procs: list[subprocess.Popen] = []
        self.outputs: list[Path] = []

    def start(self, cmd: Sequence[str], cwd: Path, env: dict[str, str]) -> None:
        cwd.mkdir(parents=True, exist_ok=True)
        out = self.logs / f"{self.name}-{len(self.procs)}.log"
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w") as f:  # the child keeps its own descriptor
            # own session: on timeout the launcher and every worker it started are killed together
            self.procs.append(
                subprocess.Popen(
                    list(cmd), cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
                )
            )
        self.outputs.append(out)

    def _kill(self) -> None:
        for p in self.procs:  # each process group: the launcher and any worker it left behind
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
        for p in self.procs:
            p.wait()

    def wait(self, timeout: float = TIMEOUT_S) -> list[str]:
        """Outputs of every process; fails unless all exit 0 in time (one failing stops the others)."""
        deadline = time.monotonic() + timeout
        timed_out = False
        try:
            while any(p.poll() is None for p in self.procs):
                failed = [p for p in self.procs if p.returncode not in (None, 0)]
                timed_out = time.monotonic() > deadline
                if failed or timed_out:
                    time.sleep(2 if failed else 0)  # let the others print what they saw
                    break
                time.sleep(0.1)
        finally:
            self._kill()
        texts = [o.read_text(errors="replace") for o in self.outputs]
        codes = [p.returncode for p in self.procs]
        detail = "\n".join(
            f"--- {self.name} process {i} (exit {c})\n{t[-4000:]}" for i, (c, t) in enumerate(zip(codes, texts))
        )
        why = f"killed after {timeout:.0f} s" if timed_out else f"exit codes {codes}"
        assert codes == [0] * len(codes) and not timed_out, f"{self.name}: {why}\n{detail}"
        return texts


def torchrun(name: str, module: str, args: Sequence[str], cwds: Sequence[Path], logs: Path) -> list[str]:
    """``torchrun --nnodes N --nproc-per-node 1 --node-rank i ... -m module args`` for each node i."""
    port = _free_port()
    launch = Launch(name, logs)
    for node, cwd in enumerate(cwds):
        cmd = [
            sys.executable, "-m", "torch.distributed.run",
            "--nnodes", str(len(cwds)), "--nproc-per-node", "1", "--node-rank", str(node),
            "--master-addr", "127.0.0.1", "--master-port", str(port), "--max-restarts", "0",
            "-m", module, *args,
        ]  # fmt: skip
        launch.start(cmd, cwd, _env())
    texts = launch.wait()
    for node, text in enumerate(texts):  # really one process of a 2-process world on each node
        assert f"GLOBAL_RANK: {node}, MEMBER: {node + 1}/{len(cwds)}" in text, text[-3000:]
    return texts


def slurm(name: str, module: str, args: Sequence[str], cwds: Sequence[Path], logs: Path) -> list[str]:
    """The program started once per task with the variables ``srun`` sets (one task per node)."""
    port = _free_port()
    launch = Launch(name, logs)
    for node, cwd in enumerate(cwds):
        env = _env(
            SLURM_JOB_ID="4242",
            SLURM_JOB_NAME="vggbackbone-multinode",  # not "bash"/"interactive", which Lightning ignores
            SLURM_NNODES=str(len(cwds)),
            SLURM_NTASKS=str(len(cwds)),
            SLURM_NTASKS_PER_NODE="1",
            SLURM_NODELIST="127.0.0.1",  # Lightning takes MASTER_ADDR from its first host
            SLURM_JOB_NODELIST="127.0.0.1",
            SLURM_PROCID=str(node),
            SLURM_LOCALID="0",
            SLURM_NODEID=str(node),
            MASTER_PORT=str(port),  # Lightning's default (15000 + the job id's last digits) may be taken
        )
        launch.start([sys.executable, "-m", module, *args], cwd, env)
    texts = launch.wait()
    for node, text in enumerate(texts):
        assert f"GLOBAL_RANK: {node}, MEMBER: {node + 1}/{len(cwds)}" in text, text[-3000:]
        assert "SLURM auto-requeueing enabled" in text, text[-3000:]  # SLURMEnvironment, not another one
    return texts


def one_process(name: str, module: str, args: Sequence[str], cwd: Path, logs: Path) -> str:
    launch = Launch(name, logs)
    launch.start([sys.executable, "-m", module, *args], cwd, _env())
    return launch.wait()[0]


# ---------------------------------------------------------------------------- outputs
def _files(folder: Path) -> list[Path]:
    return sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def _single_run(node0: Path, node1: Path, task: str) -> Path:
    """The one run folder global rank 0 wrote (node 0's ``runs/<task>/version_0``); node 1 wrote nothing."""
    assert _files(node1) == [], f"a process of node 1 wrote {_files(node1)}"
    files = _files(node0)
    assert files, "node 0 wrote nothing"
    assert all(f.parts[:2] == ("runs", task) for f in files), files
    versions = sorted({f.parts[2] for f in files if f.parts[2].startswith("version_")})
    assert versions == ["version_0"], files  # one TensorBoard/checkpoint run...
    assert sorted({f.parts[3] for f in files if f.parts[2] == "csv"}) == ["version_0"], files  # ...one CSV log
    assert [f.name for f in files if f.suffix == ".csv"] == ["metrics.csv"], files
    assert [f.name for f in files if f.name.endswith("_metrics.json")] == ["val_metrics.json"], files
    assert not [f for f in files if f.name.startswith(".") or f.suffix == ".tmp"], files  # no temp files left
    return node0 / "runs" / task / "version_0"


def _metrics(run: Path) -> dict:
    return json.loads((run / "val_metrics.json").read_text())


def _state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(ckpt)["state_dict"]


# ---------------------------------------------------------------------------- configs
def _detect_config(tmp: Path) -> Path:
    shapes = {"num_train": 8, "num_val": 5, "min_image_size": 64, "max_image_size": 96, "max_objects": 2,
              "min_object_size": 16, "max_object_size": 32, "seed": 1}  # fmt: skip
    cfg = {
        "seed_everything": 0,
        # accelerator: on the command line; default_root_dir and loggers: the defaults, runs/detect
        # relative to the working directory
        "trainer": quick_trainer(accelerator=None, limit_train_batches=2, log_every_n_steps=1),
        "model": fasterrcnn_fpn_model(width_mult=0.0625, warmup_steps=1),
        "data": shapes_data(tmp / "shared" / "shapes", shapes, eval_batch_size=1),
    }
    return write_config(cfg, tmp / "shared" / "detect.yaml")


def _reid_config(tmp: Path) -> Path:
    cfg = {
        "seed_everything": 0,
        "trainer": quick_trainer(accelerator=None, log_every_n_steps=1),
        "model": {
            "arch": "vgg11_bn",
            "width_mult": 0.0625,
            "grid_queries": 2,
            "grid_topk": 3,
            "max_rank": 5,
            "optim": {"name": "adam", "lr": 0.003, "warmup_steps": 0},
        },
        "data": {
            "root": str(tmp / "shared" / "market"),
            "synthetic": {
                "num_train_ids": 6, "num_test_ids": 5, "num_cameras": 3, "min_cameras": 2, "max_cameras": 3,
                "max_per_camera": 3, "num_distractors": 3, "num_junk": 2, "height": 64, "width": 32, "seed": 4,
            },
            "image_size": [64, 32],
            "p": 3,
            "k": 2,
            "eval_batch_size": 1,
            "num_workers": 0,
        },
    }  # fmt: skip
    return write_config(cfg, tmp / "shared" / "reid.yaml")


# ---------------------------------------------------------------------------- tests
def test_detect_two_nodes_torchrun_fit_and_validate_equal_one_process(tmp_path: Path) -> None:
    cfg = _detect_config(tmp_path)
    logs = tmp_path / "logs"
    fit0, fit1 = tmp_path / "fit" / "node0", tmp_path / "fit" / "node1"
    save = ("--model.detections_file", "{stage}_detections.json")  # every box and score, to compare too
    torchrun("fit", "tasks.detect", ["fit", "--config", str(cfg), *NODE_FLAGS, *DDP, *save], [fit0, fit1], logs)
    run = _single_run(fit0, fit1, "detect")
    ckpt = run / "checkpoints" / "last.ckpt"
    two_fit = _metrics(run)
    assert read_checkpoint(ckpt)["global_step"] == 2  # 2 steps, 2 images each

    val0, val1 = tmp_path / "validate" / "node0", tmp_path / "validate" / "node1"
    validate = ["validate", "--config", str(cfg), "--ckpt_path", str(ckpt), *save]
    torchrun("validate", "tasks.detect", [*validate, *NODE_FLAGS, *DDP], [val0, val1], logs)
    val_run = _single_run(val0, val1, "detect")
    two_val = _metrics(val_run)
    single = tmp_path / "single"
    one_process("single", "tasks.detect", [*validate, "--trainer.accelerator", "cpu"], single, logs)
    one_run = single / "runs" / "detect" / "version_0"
    one = _metrics(one_run)

    boxes = [json.loads((r / "val_detections.json").read_text()) for r in (run, val_run, one_run)]
    assert boxes[0] and boxes[0] == boxes[1] == boxes[2]

    assert one["images"] == two_fit["images"] == two_val["images"] == 5  # 3 + 2 images on the two nodes
    for key in ("AP", "AP50", "AP75", "APs", "APm", "AR1", "AR10", "AR100"):
        assert two_fit[key] == two_val[key] == one[key], key


def test_reid_two_nodes_torchrun_fit_validate_extract_equal_one_process(tmp_path: Path) -> None:
    from tasks.reid_extract import load_embeddings

    cfg = _reid_config(tmp_path)
    logs = tmp_path / "logs"
    fit0, fit1 = tmp_path / "fit" / "node0", tmp_path / "fit" / "node1"
    torchrun("fit", "tasks.reid", ["fit", "--config", str(cfg), *NODE_FLAGS, *DDP], [fit0, fit1], logs)
    run = _single_run(fit0, fit1, "reid")
    assert (run / "retrieval" / "val_epoch000.png").is_file()
    ckpt = run / "checkpoints" / "last.ckpt"
    two_fit = _metrics(run)

    val0, val1 = tmp_path / "validate" / "node0", tmp_path / "validate" / "node1"
    validate = ["validate", "--config", str(cfg), "--ckpt_path", str(ckpt)]
    torchrun("validate", "tasks.reid", [*validate, *NODE_FLAGS, *DDP], [val0, val1], logs)
    two_val = _metrics(_single_run(val0, val1, "reid"))
    single = tmp_path / "single"
    one_process("single", "tasks.reid", [*validate, "--trainer.accelerator", "cpu"], single, logs)
    one = _metrics(single / "runs" / "reid" / "version_0")
    assert one["num_query"] == two_fit["num_query"] == two_val["num_query"] > 0
    assert one["num_gallery"] == two_fit["num_gallery"] == two_val["num_gallery"] > 0
    for key in ("mAP", "rank1", "rank5", "cmc"):
        assert two_fit[key] == two_val[key] == one[key], key

    # extraction over two nodes: one output file, equal bit for bit to a one-process extraction
    # (batch size 1 and fp32: each image goes through exactly the same computation in both runs)
    images = tmp_path / "shared" / "market" / "query"
    extract = ["extract", "--ckpt", str(ckpt), "--images", str(images), "--batch_size", "1", "--num_workers", "0"]
    extract += ["--precision", "fp32"]
    out2, out1 = tmp_path / "shared" / "emb2" / "embeddings.npz", tmp_path / "shared" / "emb1" / "embeddings.npz"
    ext0, ext1 = tmp_path / "extract" / "node0", tmp_path / "extract" / "node1"
    torchrun("extract", "tasks.reid", [*extract, "--out", str(out2), *NODE_FLAGS, *DDP], [ext0, ext1], logs)
    assert _files(ext0) == _files(ext1) == []  # everything went to the (shared) output folder
    # shards merged and removed: one file, and the manifest recording it
    assert _files(out2.parent) == sorted([Path(out2.name), Path(f".{out2.name}.manifest.json")])
    one_process("extract-single", "tasks.reid", [*extract, "--out", str(out1)], tmp_path / "extract" / "single", logs)
    two_nodes, single_process = load_embeddings(out2), load_embeddings(out1)
    assert sorted(two_nodes) == sorted(single_process)
    for key, value in single_process.items():
        assert value.dtype == two_nodes[key].dtype and value.tobytes() == two_nodes[key].tobytes(), key
    assert two_nodes["paths"].tolist() == sorted(p.name for p in images.glob("*.jpg"))
    assert np.isfinite(two_nodes["embeddings"]).all() and len(two_nodes["embeddings"]) > 2


def test_reid_two_nodes_slurm_fit_equals_one_process_and_resumes_from_last(tmp_path: Path) -> None:
    """The sbatch recipe of docs/cluster.md: ``last.ckpt`` in a fixed shared folder and ``--ckpt_path last``,
    so the first start trains from scratch and a requeued job resumes where the last epoch ended."""
    cfg = _reid_config(tmp_path)
    logs = tmp_path / "logs"
    ckpts = tmp_path / "shared" / "checkpoints"
    fit = ["fit", "--config", str(cfg), *NODE_FLAGS, *DDP, "--last_checkpoint.dirpath", str(ckpts)]
    fit += ["--ckpt_path", "last"]
    fit0, fit1 = tmp_path / "fit" / "node0", tmp_path / "fit" / "node1"
    first = slurm("fit", "tasks.reid", fit, [fit0, fit1], logs)
    assert "no last checkpoint available" in first[0]  # nothing to resume: from scratch (rank 0 says so)
    run = _single_run(fit0, fit1, "reid")
    assert _files(ckpts) == [Path("last.ckpt")]
    two_fit = _metrics(run)
    steps = read_checkpoint(ckpts / "last.ckpt")["global_step"]
    assert steps > 0

    single = tmp_path / "single"
    validate = ["validate", "--config", str(cfg), "--ckpt_path", str(ckpts / "last.ckpt")]
    one_process("single", "tasks.reid", [*validate, "--trainer.accelerator", "cpu"], single, logs)
    one = _metrics(single / "runs" / "reid" / "version_0")
    assert one["num_query"] == two_fit["num_query"] > 0
    for key in ("mAP", "rank1", "rank5", "cmc"):
        assert two_fit[key] == one[key], key

    # the job requeued after a preemption: the same command (here with one more epoch to go)
    again0, again1 = tmp_path / "again" / "node0", tmp_path / "again" / "node1"
    second = slurm("resume", "tasks.reid", [*fit, "--trainer.max_epochs", "2"], [again0, again1], logs)
    assert "Restored all states from the checkpoint at " + str(ckpts / "last.ckpt") in second[0]
    _single_run(again0, again1, "reid")
    resumed = read_checkpoint(ckpts / "last.ckpt")
    assert (resumed["epoch"], resumed["global_step"]) == (1, 2 * steps)  # went on from epoch 1, not from 0
