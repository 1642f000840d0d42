"""``--ckpt_path last``: the newest ``last.ckpt`` of the run's root, resumed in its own version folder, or an error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cli_configs import tiny_segment_config


def test_ckpt_path_last_resumes_the_newest_run_in_its_version_folder(tmp_path: Path) -> None:
    from tasks.segment import main

    cfg = tiny_segment_config(tmp_path)
    runs = tmp_path / "runs" / "seg"
    with pytest.raises(FileNotFoundError, match=rf"--ckpt_path last: no last\.ckpt under {tmp_path / 'runs'}"):
        main(["fit", "--config", str(cfg), "--ckpt_path", "last"])
    main(["fit", "--config", str(cfg), "--trainer.limit_train_batches", "1"])  # version_0: 1 step
    main(["fit", "--config", str(cfg)])  # version_1: 3 steps, the newest
    assert sorted(p.name for p in runs.iterdir()) == ["version_0", "version_1"]

    main(["fit", "--config", str(cfg), "--trainer.max_epochs", "2", "--ckpt_path", "last"])
    assert sorted(p.name for p in runs.iterdir()) == ["version_0", "version_1"]  # no new version folder
    resumed = torch.load(runs / "version_1" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert (resumed["epoch"], resumed["global_step"]) == (1, 6)  # went on from version_1's step 3
    assert torch.load(runs / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 1
    # a fixed last_checkpoint.dirpath (the cluster recipe, tests/test_multinode.py): nothing there yet is the
    # first start of a job, trained from scratch; a later start resumes from it
