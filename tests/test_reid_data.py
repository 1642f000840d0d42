"""ReID data: Market-1501 names and junk rules, CSV splits, PK sampling (incl. several ranks),
the synthetic generator, unreadable images."""

from __future__ import annotations

import collections
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks.data.market import MarketConfig, ensure_market, generate_market
from tasks.data.reid import (
    PKSampler,
    ReIDDataModule,
    ReIDDataset,
    collate_reid,
    parse_market_name,
    read_market_split,
    read_pid_csv,
)

REPO = Path(__file__).resolve().parents[1]
TINY = MarketConfig(
    num_train_ids=6,
    num_test_ids=5,
    num_cameras=3,
    min_cameras=2,
    max_cameras=3,
    max_per_camera=2,
    num_distractors=3,
    num_junk=2,
    height=32,
    width=16,
    seed=1,
)


@pytest.fixture(scope="module")
def market(tmp_path_factory) -> Path:
    return generate_market(tmp_path_factory.mktemp("reid") / "market", TINY, progress=False)


def test_parse_market_names():
    assert parse_market_name("0002_c1s1_000451_03.jpg") == (2, 0)
    assert parse_market_name("-1_c3s2_001234_01.jpg") == (-1, 2)
    assert parse_market_name("0000_c6s4_002222_05.jpg") == (0, 5)
    assert parse_market_name("0001_c2_f0046182.jpg") == (1, 1)  # DukeMTMC-reID
    assert parse_market_name("Thumbs.db") is None
    assert parse_market_name("0001_c0s1_000001_01.jpg") is None  # cameras count from 1


def test_market_split_rules(tmp_path):
    folder = tmp_path / "bounding_box_test"
    folder.mkdir()
    for name in [
        "0001_c1s1_000001_01.jpg",
        "0001_c2s1_000002_01.jpg",
        "0000_c3s1_000003_01.jpg",
        "-1_c1s1_000004_01.jpg",
        "garbage.jpg",
        "Thumbs.db",
    ]:
        (folder / name).write_bytes(b"x")
    with pytest.warns(UserWarning, match=r"skipped 1 image\(s\) whose names .*garbage.jpg"):
        gallery = read_market_split(folder, keep_distractors=True)
    assert [(s.pid, s.camid) for s in gallery] == [(0, 2), (1, 0), (1, 1)]  # junk -1 gone
    with pytest.warns(UserWarning):
        train = read_market_split(folder, keep_distractors=False)
    assert [s.pid for s in train] == [1, 1]  # distractors are not an identity to learn
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_market_split(tmp_path / "nowhere", keep_distractors=True)


def test_pid_csv(tmp_path):
    good = tmp_path / "train.csv"
    good.write_text("path,pid,camid\nimgs/a.jpg,3,0\n/abs/b.jpg,3,1\nimgs/c.jpg,-1,0\n")
    samples = read_pid_csv(good)
    assert [(Path(s.path), s.pid, s.camid) for s in samples] == [
        (tmp_path / "imgs/a.jpg", 3, 0),
        (Path("/abs/b.jpg"), 3, 1),
    ]
    bad = tmp_path / "bad.csv"
    bad.write_text("path,pid,camid\na.jpg,3,0\nb.jpg,x,0\n")
    with pytest.raises(ValueError, match=r"bad.csv:3: pid and camid must be integers"):
        read_pid_csv(bad)
    header = tmp_path / "header.csv"
    header.write_text("file,pid\na.jpg,1\n")
    with pytest.raises(ValueError, match=r"header.csv: the header must name path,pid,camid \(missing: camid, path\)"):
        read_pid_csv(header)


def test_pk_sampler_batches_and_ranks():
    labels = np.repeat(np.arange(10), [2, 3, 4, 5, 6, 7, 8, 9, 10, 1])
    p, k = 4, 3
    single = PKSampler(labels, p, k, num_replicas=1, rank=0, seed=5)
    order = list(single)
    assert len(order) == len(single) and len(order) % (p * k) == 0
    for b in range(0, len(order), p * k):
        counts = collections.Counter(labels[order[b : b + p * k]].tolist())
        assert len(counts) == p and set(counts.values()) == {k}  # P identities x K images
    # two ranks: the same number of batches, different batches, each batch still P x K
    r0, r1 = (PKSampler(labels, p, k, num_replicas=2, rank=r, seed=5) for r in (0, 1))
    b0, b1 = list(r0), list(r1)
    assert len(b0) == len(b1) == len(r0) == len(single) // 2 // (p * k) * (p * k)
    assert b0 != b1
    for b in range(0, len(b1), p * k):
        assert set(collections.Counter(labels[b1[b : b + p * k]].tolist()).values()) == {k}
    # a new epoch is a new plan, the same epoch the same plan
    r0.set_epoch(1)
    assert list(r0) != b0
    r0.set_epoch(0)
    assert list(r0) == b0
    with pytest.raises(ValueError, match="at least P=20 identities"):
        PKSampler(labels, 20, 2)


def test_synthetic_market_layout(market):
    train = read_market_split(market / "bounding_box_train", keep_distractors=False)
    query = read_market_split(market / "query", keep_distractors=False)
    gallery = read_market_split(market / "bounding_box_test", keep_distractors=True)
    assert len({s.pid for s in train}) == 6 and len({s.pid for s in query}) == 5
    assert not {s.pid for s in train} & {s.pid for s in query}
    assert sum(s.pid == 0 for s in gallery) == 3
    assert len(list((market / "bounding_box_test").glob("-1_*.jpg"))) == 2
    # Market's rule: one query per identity and camera, each with a gallery match in another camera
    assert len({(s.pid, s.camid) for s in query}) == len(query)
    for q in query:
        assert any(g.pid == q.pid and g.camid != q.camid for g in gallery)
    assert {s.camid for s in train + query + gallery} <= {0, 1, 2}


def test_synthetic_market_is_deterministic_and_ensured_once(tmp_path, market):
    again = generate_market(tmp_path / "again", TINY, progress=False)
    names = sorted(p.relative_to(market).as_posix() for p in market.rglob("*.jpg"))
    assert names == sorted(p.relative_to(again).as_posix() for p in again.rglob("*.jpg"))
    assert (market / names[0]).read_bytes() == (again / names[0]).read_bytes()
    stamp = (again / names[0]).stat().st_mtime_ns
    ensure_market(again, TINY, progress=False)  # same config: left alone
    assert (again / names[0]).stat().st_mtime_ns == stamp
    other = MarketConfig(**{**TINY.__dict__, "seed": 2})
    ensure_market(again, other, progress=False)  # another config: regenerated
    assert sorted(p.relative_to(again).as_posix() for p in again.rglob("*.jpg")) != names


def test_data_cli_writes_market(tmp_path):
    out = tmp_path / "m"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "tasks.data",
            "market",
            "--out",
            str(out),
            "--num-train-ids",
            "3",
            "--num-test-ids",
            "2",
            "--num-cameras",
            "2",
            "--max-cameras",
            "2",
            "--height",
            "32",
            "--width",
            "16",
        ],
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        check=True,
        capture_output=True,
    )
    assert len({p.name[:4] for p in (out / "bounding_box_train").glob("*.jpg")}) == 3


def test_unreadable_images_are_skipped_and_counted(tmp_path, market):
    dm = ReIDDataModule(root=str(market), image_size=(32, 16), p=2, k=2, num_workers=0)
    dm.setup("fit")
    assert dm.num_classes == 6
    samples = dm.train_set.samples[:3]
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    bad = type(samples[0])(str(tmp_path / "broken.jpg"), samples[0].pid, samples[0].camid)
    ds = ReIDDataset([samples[0], bad, samples[1]], dm.eval_transform)
    batch = collate_reid([ds[i] for i in range(3)])
    assert batch["image"].shape == (2, 3, 32, 16) and batch["index"].tolist() == [0, 2]
    assert batch["image"].min() >= 0 and batch["image"].max() <= 1
    assert len(batch["skipped"]) == 1 and batch["skipped"][0][0].endswith("broken.jpg")
    assert "cannot decode" in batch["skipped"][0][1]
    # the evaluation set is query then gallery, flagged
    ev = collate_reid([dm.val_dataloader().dataset[i] for i in (0, dm.num_query)])
    assert ev["is_query"].tolist() == [True, False]


# ---------------------------------------------------------------------------- identities below -1
def test_market_identities_below_minus_one_are_skipped_and_counted(tmp_path: Path) -> None:
    folder = tmp_path / "bounding_box_train"
    folder.mkdir()
    for name in ("0002_c1s1_000451_03.jpg", "-1_c1s1_000001_00.jpg", "-002_c2s1_000001_00.jpg", "0000_c3s1_01.jpg"):
        Image.new("RGB", (8, 16)).save(folder / name)
    with pytest.warns(UserWarning, match=r"skipped 1 image\(s\) whose identity is below -1 .*-002_c2s1_000001_00\.jpg"):
        samples = read_market_split(folder, keep_distractors=True)
    assert sorted(s.pid for s in samples) == [0, 2]  # -1 junk dropped, 0 distractor kept, -2 skipped


def test_csv_identity_below_minus_one_is_an_error_naming_the_line(tmp_path: Path) -> None:
    (tmp_path / "split.csv").write_text("path,pid,camid\na.jpg,3,0\nb.jpg,-1,0\nc.jpg,-2,1\n")
    with pytest.raises(ValueError, match=r"split\.csv:4: pid must be >= -1 \(-1 = junk, 0 = distractor\), got -2"):
        read_pid_csv(tmp_path / "split.csv")
