"""Embedding extraction from Python: folder and list inputs, unreadable files, order, resuming
after a crash, atomic output, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from inference_probe import embed_directly
from PIL import Image

from tasks.images import list_images
from tasks.reid_extract import extract_embeddings, load_embeddings
from vggbackbone.models import reid_vgg
from vggbackbone.optimize import RELATIVE_TOLERANCE

TRAINER = {"accelerator": "cpu", "enable_progress_bar": False}
# fp32: rows compared with the plain model to 1e-5 (precision="auto" is bf16 on AMX CPUs)
EXACT = {"precision": "fp32", "trainer": TRAINER}


@pytest.fixture()
def images(tmp_path):
    root = tmp_path / "imgs"
    (root / "b").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ["a1.jpg", "a2.png", "b/c3.jpg", "b/c4.jpg", "z5.jpg", "z6.jpg", "z7.jpg"]:
        Image.fromarray(rng.integers(0, 255, (40, 20, 3), dtype=np.uint8)).save(root / name)
    (root / "b" / "empty.jpg").write_bytes(b"")
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture()
def net():
    torch.manual_seed(0)
    return reid_vgg("vgg11", width_mult=0.125, embedding_dim=12).eval()


def test_folder_rows_match_paths_and_bad_files_are_skipped(tmp_path, images, net):
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image\(s\): b/empty.jpg \(image file is empty\)"):
        out = extract_embeddings(
            net, images, tmp_path / "emb.npz", image_size=(32, 16), batch_size=3, num_workers=0, **EXACT
        )
    d = load_embeddings(out)
    assert d["paths"].tolist() == ["a1.jpg", "a2.png", "b/c3.jpg", "b/c4.jpg", "z5.jpg", "z6.jpg", "z7.jpg"]
    assert d["embeddings"].shape == (7, 12) and d["embeddings"].dtype == np.float32
    np.testing.assert_allclose(d["embeddings"], embed_directly(net, [images / p for p in d["paths"]]), atol=1e-5)
    assert d["skipped_paths"].tolist() == ["b/empty.jpg"]
    assert not (tmp_path / ".emb.npz.parts").exists()


def test_list_input_keeps_its_order_and_names(tmp_path, images, net):
    lst = images / "list.txt"
    lst.write_text("# a list\nz6.jpg\n\nb/c3.jpg\n" + f"{images / 'a1.jpg'}\n")
    names, files = list_images(lst)
    assert names == ["z6.jpg", "b/c3.jpg", str(images / "a1.jpg")] and files[0] == images / "z6.jpg"
    out = extract_embeddings(net, lst, tmp_path / "l.npz", image_size=(32, 16), num_workers=0, **EXACT)
    d = load_embeddings(out)
    assert d["paths"].tolist() == names
    np.testing.assert_allclose(d["embeddings"], embed_directly(net, files), atol=1e-5)


def test_bf16_extraction_stays_within_the_documented_tolerance(tmp_path, images, net):
    with pytest.warns(UserWarning, match="skipped 1"):
        out = extract_embeddings(net, images, tmp_path / "bf16.npz", image_size=(32, 16), num_workers=0,
                                 precision="bf16", trainer=TRAINER)  # fmt: skip
    d = load_embeddings(out)
    ref = embed_directly(net, [images / p for p in d["paths"]])
    err = np.abs(d["embeddings"] - ref).max() / np.abs(ref).max()
    assert d["embeddings"].dtype == np.float32
    assert 0 < err <= RELATIVE_TOLERANCE["bf16"], err  # > 0: it really ran in bf16


class _Crash(pl.Callback):
    def on_predict_batch_end(self, trainer, *args) -> None:
        if trainer.predict_loop.batch_progress.current.completed >= 2:
            raise RuntimeError("simulated crash")


def test_crash_leaves_no_output_and_a_rerun_resumes(tmp_path, images, net, capsys):
    out = tmp_path / "r.npz"
    with pytest.raises(RuntimeError, match="simulated crash"):
        extract_embeddings(net, images, out, image_size=(32, 16), batch_size=2, num_workers=0, precision="fp32",
                           trainer={**TRAINER, "callbacks": [_Crash()]})  # fmt: skip
    assert not out.exists() and (tmp_path / ".r.npz.manifest.json").is_file()
    with pytest.warns(UserWarning, match="skipped 1"):
        extract_embeddings(net, images, out, image_size=(32, 16), batch_size=2, num_workers=0, **EXACT)
    assert "4 of 8 images were done by an earlier run" in capsys.readouterr().out
    d = load_embeddings(out)
    assert len(d["paths"]) == 7 and len(set(d["paths"].tolist())) == 7
    np.testing.assert_allclose(d["embeddings"], embed_directly(net, [images / p for p in d["paths"]]), atol=1e-5)
    # another model: the old shards are not reused
    with pytest.raises(RuntimeError):
        extract_embeddings(net, images, out, image_size=(32, 16), batch_size=2, num_workers=0, precision="fp32",
                           trainer={**TRAINER, "callbacks": [_Crash()]})  # fmt: skip
    other = reid_vgg("vgg11", width_mult=0.125, embedding_dim=12).eval()
    with pytest.warns(UserWarning):
        extract_embeddings(other, images, out, image_size=(32, 16), batch_size=2, num_workers=0, **EXACT)
    assert "earlier run" not in capsys.readouterr().out
    np.testing.assert_allclose(
        load_embeddings(out)["embeddings"], embed_directly(other, [images / p for p in d["paths"]]), atol=1e-5
    )


def test_clear_errors(tmp_path, images, net):
    with pytest.raises(ValueError, match=r"out.npy: the output must be a .npz file"):
        extract_embeddings(net, images, tmp_path / "out.npy", image_size=(32, 16))
    with pytest.raises(FileNotFoundError, match="nowhere: no such image, folder or image list"):
        extract_embeddings(net, tmp_path / "nowhere", tmp_path / "o.npz", image_size=(32, 16))
    with pytest.raises(ValueError, match="image_size is required"):
        extract_embeddings(net, images, tmp_path / "o.npz")
    with pytest.raises(FileNotFoundError, match="missing.ckpt: checkpoint not found"):
        extract_embeddings(tmp_path / "missing.ckpt", images, tmp_path / "o.npz")
    from tasks.reid import extract_embeddings as extract_checkpoint

    with pytest.raises(FileNotFoundError, match="missing.ckpt: checkpoint not found"):
        extract_checkpoint(tmp_path / "missing.ckpt", images, tmp_path / "o.npz")
    (tmp_path / "some.ckpt").write_bytes(b"")
    with pytest.raises(
        TypeError, match="some.ckpt: a checkpoint needs its task class: use tasks.reid.extract_embeddings"
    ):
        extract_embeddings(tmp_path / "some.ckpt", images, tmp_path / "o.npz")


def test_merge_in_many_chunks_keeps_every_row_in_order(tmp_path, images, net, monkeypatch):
    import tasks.embeddings_file as rx

    monkeypatch.setattr(rx, "_MERGE_BYTES", 2 * 12 * 4)  # two 12-d embeddings per chunk
    monkeypatch.setattr(rx, "_MERGE_ROWS", 3)  # three paths per chunk
    with pytest.warns(UserWarning, match="skipped 1"):
        out = extract_embeddings(net, images, tmp_path / "c.npz", image_size=(32, 16), batch_size=3, num_workers=0,
                                 **EXACT)  # fmt: skip
    d = load_embeddings(out)
    assert d["paths"].tolist() == ["a1.jpg", "a2.png", "b/c3.jpg", "b/c4.jpg", "z5.jpg", "z6.jpg", "z7.jpg"]
    np.testing.assert_allclose(d["embeddings"], embed_directly(net, [images / p for p in d["paths"]]), atol=1e-5)
