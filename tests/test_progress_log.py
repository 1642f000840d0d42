"""Without a terminal (``nohup``, cluster logs), ``fit`` prints plain progress lines while it trains."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from cli_configs import REPO, detect_config


def test_progress_lines_appear_during_training_when_stdout_is_not_a_tty(tmp_path: Path) -> None:
    cfg = detect_config(tmp_path, limit_train_batches=3, max_epochs=1, enable_progress_bar=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "tasks.detect", "fit", "--config", str(cfg), "--progress.every_n_steps", "1"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    lines, alive_at_first = [], None
    for line in proc.stdout:  # a pipe: not a TTY
        if line.startswith("train epoch") and alive_at_first is None:
            alive_at_first = proc.poll() is None
        lines.append(line.rstrip("\n"))
    assert proc.wait(timeout=600) == 0, "\n".join(lines[-30:])
    assert alive_at_first, "the first progress line came only when the run had ended"
    train = [ln for ln in lines if ln.startswith("train epoch")]
    pattern = r"train epoch 0 step 1/3 \(33%\) .*loss [\d.e+-]+ .*\| [\d.]+ img/s \| elapsed \d:\d\d:\d\d \| ETA"
    assert re.match(pattern, train[0]), train[0]
    assert [ln.split(" (")[0] for ln in train] == [f"train epoch 0 step {s}/3" for s in (1, 2, 3)], (
        train
    )  # step 3 is the epoch's closing line
    assert any(ln.startswith("validate step") and ln.endswith("| done") for ln in lines), lines
