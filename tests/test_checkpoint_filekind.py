"""A file given as a checkpoint or as weights that is not one: the error says what it is (text, a Git LFS
pointer, an HTML page from a failed download, truncated, empty, a plain weights file...), through the one
sniffing function of the library (:func:`vggbackbone.filekind.sniff_file`) used by both readers, and never
repeats torch's advice to load the file with ``weights_only=False``."""

from __future__ import annotations

import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tasks.checkpoint import CheckpointError, read_checkpoint
from vggbackbone.filekind import sniff_file
from vggbackbone.weights import WeightsError, load_state_dict_file

REPO = Path(__file__).resolve().parents[1]

LFS_POINTER = (
    "version https://git-lfs.github.com/spec/v1\n"
    "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
    "size 553433881\n"
)
HTML_PAGE = """<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>Google Drive - Virus scan warning</title></head>
<body><p>Google Drive can't scan this file for viruses.</p></body>
</html>
"""
#: what torch's messages advise and this project never does
UNSAFE_ADVICE = ("weights_only=False", "weights_only` set to `False`", "trusted source", "add_safe_globals")


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("true",))


def _files(tmp: Path) -> dict[str, Path]:
    """One file of each kind, written in its real format."""
    files = {
        "text": tmp / "notes.ckpt",
        "lfs": tmp / "vgg16.pth",
        "html": tmp / "download.ckpt",
        "empty": tmp / "empty.ckpt",
        "truncated": tmp / "cut.ckpt",
        "truncated_legacy": tmp / "cut_legacy.pth",
        "json": tmp / "error.ckpt",
    }
    files["text"].write_text("hello world\nthese are my notes, not a checkpoint\n")
    files["lfs"].write_text(LFS_POINTER)
    files["html"].write_text(HTML_PAGE)
    files["empty"].write_bytes(b"")
    files["json"].write_text('{"error": {"code": 403, "message": "Forbidden"}}\n')
    full = tmp / "full.pt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, full)
    files["truncated"].write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    legacy = tmp / "legacy.pt"
    torch.save({"w": torch.zeros(1000)}, legacy, _use_new_zipfile_serialization=False)
    files["truncated_legacy"].write_bytes(legacy.read_bytes()[: legacy.stat().st_size // 2])
    return files


#: what the message says each file is (both readers)
SAYS = {
    "text": r"a text file \(\d+ bytes\) starting 'hello world'",
    "lfs": r"a Git LFS pointer \(\d+ bytes\) to a 553,433,881-byte file that was not fetched.*"
    r"`git lfs pull` in the repository it comes from fetches the real file",
    "html": r"an HTML page \(\d+ bytes, titled 'Google Drive - Virus scan warning'\).*a failed download",
    "empty": r"empty file \(0 bytes\)",
    "truncated": r"truncated \(\d+ bytes: a zip archive, the container of PyTorch files, whose end is missing\)",
    "truncated_legacy": r"truncated: a PyTorch file \(legacy format\) that ends early",
    "json": r"a JSON text file \(\d+ bytes\) starting '\{\"error\"",
}


def _no_unsafe_advice(error: BaseException) -> None:
    """Neither the message nor anything chained to it (the printed traceback) suggests loading unsafely."""
    text = "".join(traceback.format_exception(error))
    for advice in UNSAFE_ADVICE:
        assert advice not in text, f"{advice!r} in:\n{text}"


@pytest.mark.parametrize("kind", sorted(SAYS))
def test_a_checkpoint_that_is_not_one_says_what_it_is(tmp_path: Path, kind: str) -> None:
    path = _files(tmp_path)[kind]
    with pytest.raises(CheckpointError, match=rf"^{path}: .*{SAYS[kind]}") as err:
        read_checkpoint(path)
    _no_unsafe_advice(err.value)


@pytest.mark.parametrize("kind", sorted(SAYS))
def test_a_weights_file_that_is_not_one_says_what_it_is(tmp_path: Path, kind: str) -> None:
    path = _files(tmp_path)[kind]
    with pytest.raises(WeightsError, match=rf"^{path}: .*{SAYS[kind]}") as err:
        load_state_dict_file(path)
    _no_unsafe_advice(err.value)


def test_the_backbone_reports_an_lfs_pointer_given_as_weights(tmp_path: Path) -> None:
    from vggbackbone import VGGBackbone

    path = _files(tmp_path)["lfs"]
    with pytest.raises(WeightsError, match=r"vgg16\.pth: a Git LFS pointer .*`git lfs pull`"):
        VGGBackbone("vgg11", weights=str(path), width_mult=0.125)


def test_a_plain_weights_file_given_as_a_checkpoint_is_named_so(tmp_path: Path) -> None:
    sd_file = tmp_path / "vgg11.pth"
    torch.save({"features.0.weight": torch.zeros(8, 3, 3, 3), "features.0.bias": torch.zeros(8)}, sd_file)
    with pytest.raises(
        CheckpointError,
        match=r"vgg11\.pth: not a Lightning checkpoint of `fit`: a plain weights file \(a state dict of 2 tensors, "
        r"e\.g\. features\.0\.weight.*goes to model\.weights_backbone",
    ):
        read_checkpoint(sd_file)
    st = tmp_path / "vgg11.safetensors"
    save_file({"features.0.weight": torch.zeros(8, 3, 3, 3)}, str(st))
    with pytest.raises(CheckpointError, match=r"vgg11\.safetensors: a safetensors file, not a checkpoint \(a weights"):
        read_checkpoint(st)


def test_a_pickle_that_runs_code_is_refused_without_the_unsafe_advice(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(2), "x": _RunsCode()}, path)
    with pytest.raises(WeightsError, match=r"evil\.pth: refused to load: .*it asks for posix\.system") as err:
        load_state_dict_file(path)
    _no_unsafe_advice(err.value)
    with pytest.raises(CheckpointError, match=r"evil\.pth: refused: .*it asks for posix\.system") as err:
        read_checkpoint(path)
    _no_unsafe_advice(err.value)


def test_a_safetensors_file_under_a_pth_name_is_read_as_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "weights.pth"
    save_file({"features.0.weight": torch.ones(8, 3, 3, 3)}, str(path))
    assert sniff_file(path).kind == "safetensors"
    sd, _ = load_state_dict_file(path)
    assert torch.equal(sd["features.0.weight"], torch.ones(8, 3, 3, 3))


def test_ckpt_path_of_an_lfs_pointer_in_the_cli(tmp_path: Path) -> None:
    """``python -m tasks.reid validate --ckpt_path <LFS pointer>``: exit 1, the message names the file and the fix."""
    path = _files(tmp_path)["lfs"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-m", "tasks.reid", "validate", "--ckpt_path", str(path), "--data.root", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode != 0
    assert f"{path}: a Git LFS pointer (" in proc.stderr and "`git lfs pull`" in proc.stderr
    assert "KeyError" not in proc.stderr
    for advice in UNSAFE_ADVICE:
        assert advice not in proc.stderr
