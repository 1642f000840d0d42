"""ReID layouts: MSMT17 lists, the CUHK03 767/700 protocol .mat, DukeMTMC-reID names under market;
query identities without a gallery image reported by the data module and the metrics."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat

from tasks.data.reid import ReIDDataModule, read_market_split, unmatched_query_ids
from tasks.data.reid_readers import ReIDSample, read_cuhk03_split, read_msmt17_split


def _msmt17(root: Path, version: str = "MSMT17_V1", train: str = "train", test: str = "test") -> Path:
    base = root / version
    (base / train).mkdir(parents=True)
    (base / test).mkdir()
    (base / "list_train.txt").write_text(
        "0000/0000_000_01_0303morning_0015_0.jpg 0\n0000/0000_001_14_0303noon_0042_1.jpg 0\n"
    )
    (base / "list_val.txt").write_text("0001/0001_005_03_0303afternoon_0100_0.jpg 1\n")
    (base / "list_query.txt").write_text("0002/0002_010_07_0113morning_0001_0.jpg 2\n")
    (base / "list_gallery.txt").write_text(
        "0002/0002_011_15_0113noon_0009_2.jpg 2\n\n0003/0003_012_02_0113noon_0010_0.jpg 3\n"
    )
    return base


def test_msmt17_lists_read_exactly(tmp_path) -> None:
    base = _msmt17(tmp_path)
    train = read_msmt17_split(tmp_path, "train")  # the parent of MSMT17_V1 works too
    assert train == [
        ReIDSample(str(base / "train/0000/0000_000_01_0303morning_0015_0.jpg"), 0, 0),
        ReIDSample(str(base / "train/0000/0000_001_14_0303noon_0042_1.jpg"), 0, 13),
    ]
    assert [(s.pid, s.camid) for s in read_msmt17_split(base, "train", with_val=True)] == [(0, 0), (0, 13), (1, 2)]
    assert read_msmt17_split(base, "query") == [
        ReIDSample(str(base / "test/0002/0002_010_07_0113morning_0001_0.jpg"), 2, 6)
    ]
    gallery = read_msmt17_split(base, "gallery")
    assert [(Path(s.path).parent.parent.name, s.pid, s.camid) for s in gallery] == [("test", 2, 14), ("test", 3, 1)]


def test_msmt17_v2_folders_and_bad_lines(tmp_path) -> None:
    base = _msmt17(tmp_path, "MSMT17_V2", "mask_train_v2", "mask_test_v2")
    assert read_msmt17_split(base, "query")[0].path.startswith(str(base / "mask_test_v2"))
    (base / "list_query.txt").write_text("0002/0002_010_07_x.jpg 2\n0002/0002_010.jpg 2\n")
    with pytest.raises(ValueError, match=r"list_query\.txt:2: no camera in the name '0002_010\.jpg'"):
        read_msmt17_split(base, "query")
    (base / "list_query.txt").write_text("0002/0002_010_07_x.jpg two\n")
    with pytest.raises(ValueError, match=r"list_query\.txt:1: a line is 'path pid'"):
        read_msmt17_split(base, "query")


def _cuhk03(root: Path, boxes: str = "labeled") -> None:
    names = ["1_001_1_01.png", "1_001_2_06.png", "1_002_1_02.png", "1_002_2_07.png", "1_003_1_01.png"]
    filelist = np.empty((len(names), 1), dtype=object)
    for i, n in enumerate(names):
        filelist[i, 0] = n
    savemat(
        root / f"cuhk03_new_protocol_config_{boxes}.mat",
        {
            "filelist": filelist,
            "labels": np.array([[1], [1], [2], [2], [3]], np.uint16),
            "camId": np.array([[1], [2], [1], [2], [1]], np.uint8),
            "train_idx": np.array([[1], [2]], np.uint16),  # 1-based (MATLAB)
            "query_idx": np.array([[3], [5]], np.uint16),
            "gallery_idx": np.array([[4]], np.uint16),
        },
    )


def test_cuhk03_protocol_mat_read_exactly(tmp_path) -> None:
    _cuhk03(tmp_path, "detected")
    folder = tmp_path / "images_detected"
    assert read_cuhk03_split(tmp_path, "train", "detected") == [
        ReIDSample(str(folder / "1_001_1_01.png"), 1, 0),
        ReIDSample(str(folder / "1_001_2_06.png"), 1, 1),
    ]
    assert read_cuhk03_split(tmp_path, "query", "detected") == [
        ReIDSample(str(folder / "1_002_1_02.png"), 2, 0),
        ReIDSample(str(folder / "1_003_1_01.png"), 3, 0),
    ]
    assert read_cuhk03_split(tmp_path, "gallery", "detected") == [ReIDSample(str(folder / "1_002_2_07.png"), 2, 1)]
    with pytest.raises(FileNotFoundError, match="cuhk03_new_protocol_config_labeled.mat"):
        read_cuhk03_split(tmp_path, "train", "labeled")


def test_cuhk03_index_outside_the_filelist_is_an_error(tmp_path) -> None:
    _cuhk03(tmp_path)
    mat = tmp_path / "cuhk03_new_protocol_config_labeled.mat"
    from scipy.io import loadmat

    data = {k: v for k, v in loadmat(mat).items() if not k.startswith("__")}
    data["gallery_idx"] = np.array([[6]], np.uint16)
    savemat(mat, data)
    with pytest.raises(ValueError, match=r"gallery_idx has 1 index\(es\) outside 1\.\.5: \[6\]"):
        read_cuhk03_split(tmp_path, "gallery")


def _png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 16), (90, 90, 90)).save(path)


def test_duke_names_under_market_and_unmatched_queries_warned(tmp_path) -> None:
    for rel in ("bounding_box_train/0001_c2_f0046182.jpg", "bounding_box_train/0001_c5_f0051341.jpg",
                "query/0005_c2_f0046985.jpg", "query/0007_c1_f0047777.jpg", "query/0007_c3_f0048888.jpg",
                "bounding_box_test/0005_c6_f0049999.jpg", "bounding_box_test/0000_c3_f0000001.jpg",
                "bounding_box_test/-1_c1_f0000002.jpg"):  # fmt: skip
        _png(tmp_path / rel)
    train = read_market_split(tmp_path / "bounding_box_train", keep_distractors=False)
    assert [(Path(s.path).name, s.pid, s.camid) for s in train] == [
        ("0001_c2_f0046182.jpg", 1, 1),
        ("0001_c5_f0051341.jpg", 1, 4),
    ]
    dm = ReIDDataModule(root=str(tmp_path), p=1, k=2, num_workers=0)
    with pytest.warns(
        UserWarning, match=r"1 query identit\(y/ies\) \(2 query images\) have no image in the gallery.*\[7\]"
    ):
        dm.setup("validate")
    assert dm.unmatched_queries == {7: 2}
    assert [(s.pid, s.camid) for s in dm.gallery_set.samples] == [(0, 2), (5, 5)]  # junk dropped, distractor kept
    assert unmatched_query_ids(dm.query_set.samples, []) == {5: 1, 7: 2}


def test_metrics_report_queries_without_gallery(tmp_path) -> None:
    from tasks.reid_eval import ReIDEvaluation

    hp = SimpleNamespace(distance="euclidean", max_rank=5, eval_chunk_size=None, rerank=False, rerank_k1=20,
                         rerank_k2=6, rerank_lambda=0.3, grid_topk=0, grid_queries=0, aqe=False, aqe_times=1,
                         aqe_k=5, aqe_alpha=3.0)  # fmt: skip
    fake = SimpleNamespace(hparams=hp, device="cpu", trainer=SimpleNamespace(state=SimpleNamespace(fn=None)),
                           current_epoch=0, _save_grid=lambda *a: None)  # fmt: skip
    # queries: pid 1 (cam 0), pid 7 (cam 0), pid 9 (cam 1), pid 2 (cam 0, its only gallery image also on cam 0)
    pid = np.array([1, 7, 9, 2, 1, 3, 2])
    camid = np.array([0, 0, 1, 0, 1, 1, 0])
    is_query = np.array([True, True, True, True, False, False, False])
    emb = np.eye(7, 3, dtype=np.float32)
    report = ReIDEvaluation._rank(fake, "test", tmp_path, np.arange(7), pid, camid, is_query, emb)
    assert report.extra["num_query"] == 4 and report.extra["num_valid_queries"] == 1
    assert report.extra["queries_without_match"] == 3
    assert report.extra["queries_without_gallery"] == 2 and report.extra["query_ids_without_gallery"] == [7, 9]
    assert dict(report.table)["query ids not in gallery"] == ["2: [7, 9]"]
    assert torch.isfinite(torch.tensor(report.metrics["mAP"]))


def test_reid_fit_on_an_msmt17_tree(tmp_path) -> None:
    """One training step and the validation ranking on MSMT17 lists (identities from 0, cameras from names)."""
    import json

    from cli_configs import csv_versions, quick_trainer, write_config

    from tasks.reid import main

    base = tmp_path / "MSMT17_V2"
    lists: dict[str, list[str]] = {"train": [], "val": [], "query": [], "gallery": []}
    rng = np.random.default_rng(0)
    for pid in range(4):  # train ids 0, 1 (2 cameras x 2 crops); test ids 2, 3: query cam 1, gallery cam 2
        for cam in (1, 2):
            for k in range(2):
                name = f"{pid:04d}/{pid:04d}_{k:03d}_{cam:02d}_0303morning_{k:04d}_0.jpg"
                split = "train" if pid < 2 else ("query" if cam == 1 else "gallery")
                folder = "mask_train_v2" if pid < 2 else "mask_test_v2"
                (base / folder / name).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 255, (32, 16, 3), dtype=np.uint8)).save(base / folder / name)
                lists[split].append(f"{name} {pid}\n")
    for split, lines in lists.items():
        (base / f"list_{split}.txt").write_text("".join(lines))
    cfg = {
        "seed_everything": 0,
        "trainer": quick_trainer(tmp_path, limit_train_batches=1),
        "model": {"arch": "vgg11_bn", "width_mult": 0.0625, "grid_queries": 0, "max_rank": 2},
        "data": {"root": str(tmp_path), "layout": "msmt17", "image_size": [32, 16], "p": 2, "k": 2,
                 "eval_batch_size": 8, "num_workers": 0},
    }  # fmt: skip
    main(["fit", "--config", str(write_config(cfg, tmp_path / "reid.yaml"))])
    run = csv_versions(tmp_path)[-1]
    metrics = json.loads((run / "val_metrics.json").read_text())
    assert metrics["num_query"] == 4 and metrics["num_gallery"] == 4 and metrics["num_valid_queries"] == 4
    assert metrics["queries_without_match"] == 0 and metrics["query_ids_without_gallery"] == []
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 1 and ckpt["hyper_parameters"]["num_classes"] == 2
