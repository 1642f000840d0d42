"""The options that make each recipe follow its reference exactly, each shown to act,
and the shipped recipes setting them to the reference's values.

SSD: ``clip_default_boxes`` (the authors' prior boxes are not clipped); ReID: ``center_init``,
``erasing_scale``, ``pk_padding`` (reid-strong-baseline's centres, erasing and sampler epoch);
the recipes' values, each with the reference file it comes from.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tasks.data.reid import PKSampler, ReIDDataModule
from tasks.reid import CenterLoss, ReIDTask
from vggbackbone.models import ssd_vgg

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- SSD
@pytest.mark.parametrize("clip", [True, False])
def test_ssd_default_boxes_are_clipped_only_when_asked(clip: bool) -> None:
    from torchvision.models.detection.image_list import ImageList

    model = ssd_vgg("vgg11", 300, num_classes=3, width_mult=0.0625, box_scales="voc", clip_default_boxes=clip)
    images = torch.rand(1, 3, 300, 300)
    with torch.no_grad():
        feats = list(model.backbone(images).values())
    boxes = model.anchor_generator(ImageList(images, [(300, 300)]), feats)[0]
    widest = float(((boxes[:, 2:] - boxes[:, :2]) / 300).max())
    # the last source's aspect-2 box is 0.88 * sqrt(2) = 1.245 image sides wide (voc scales)
    assert (widest == pytest.approx(1.0)) if clip else (widest == pytest.approx(0.88 * 2**0.5, rel=1e-4))


# ----------------------------------------------------------------------------- ReID
def test_center_loss_starts_from_zeros_or_a_standard_normal() -> None:
    assert torch.equal(CenterLoss(751, 64).centers, torch.zeros(751, 64))
    torch.manual_seed(0)
    c = CenterLoss(751, 64, init="randn").centers
    assert abs(float(c.mean())) < 0.02 and abs(float(c.std()) - 1) < 0.02
    torch.manual_seed(0)
    assert torch.equal(CenterLoss(751, 64, init="randn").centers, c)  # seeded: resumable and repeatable
    task = ReIDTask(num_classes=5, center_weight=1e-3, center_init="randn", arch="vgg11", width_mult=0.0625)
    assert task.center is not None and float(task.center.centers.abs().sum()) > 0
    assert task.hparams["center_init"] == "randn"
    with pytest.raises(ValueError, match="center_init"):
        CenterLoss(3, 4, init="ones")


def _erased_fractions(scale: tuple[float, float], n: int = 12) -> list[float]:
    dm = ReIDDataModule(image_size=(64, 32), hflip=0.0, pad=0, random_erasing=1.0, erasing_scale=scale)
    torch.manual_seed(0)
    image = torch.full((3, 64, 32), 255, dtype=torch.uint8)  # white: erased pixels are the mean pixel
    return [float((dm.train_transform(image)[0] < 0.5).float().mean()) for _ in range(n)]


def test_random_erasing_covers_up_to_the_given_fraction() -> None:
    default = _erased_fractions((0.02, 0.33))
    assert max(default) <= 0.34  # torchvision's default: at most a third (h, w rounded)
    strong = _erased_fractions((0.36, 0.4))  # the strong baseline's sh 0.4
    erased = [f for f in strong if f > 0]
    assert erased and all(0.34 < f <= 0.42 for f in erased)


def _epoch(padding: str, sizes=(2, 4, 5, 8, 9), k: int = 4) -> list[int]:
    labels = np.repeat(np.arange(len(sizes)), sizes)
    return list(PKSampler(labels, p=1, k=k, padding=padding)), labels


def test_pk_sampler_pads_every_identity_or_only_those_below_k() -> None:
    # identities of 2, 4, 5, 8 and 9 images at K=4 (P=1: the epoch uses every group)
    multiple, labels = _epoch("multiple")
    assert len(multiple) == 4 * (1 + 1 + 2 + 2 + 3)  # every identity padded to a multiple of K
    below, _ = _epoch("below_k")
    assert len(below) == 4 * (1 + 1 + 1 + 2 + 2)  # reid-strong-baseline: only the 2-image one padded
    groups = [below[i : i + 4] for i in range(0, len(below), 4)]
    for g in groups:
        pid = labels[g[0]]
        assert all(labels[i] == pid for i in g)
        if (labels == pid).sum() >= 4:
            assert len(set(g)) == 4  # no image repeated for identities with K images or more
    per_pid = {int(p): sum(labels[i] == p for i in below) for p in range(5)}
    assert per_pid == {0: 4, 1: 4, 2: 4, 3: 8, 4: 8}
    with pytest.raises(ValueError, match="padding"):
        PKSampler(labels, p=1, k=4, padding="all")


def test_reid_data_module_hands_its_padding_to_the_sampler(tmp_path: Path) -> None:
    from tests.recipe_trees import make_market_tree

    make_market_tree(tmp_path / "m")
    dm = ReIDDataModule(root=str(tmp_path / "m"), p=1, k=2, pk_padding="below_k")
    dm.setup("fit")
    assert dm.train_sampler().padding == "below_k"
    with pytest.raises(ValueError, match="pk_padding"):
        ReIDDataModule(pk_padding="every")


# ----------------------------------------------------------------------------- the recipes
def _get(cfg: dict, dotted: str):
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


#: (recipe, key, the reference's value, where the reference sets it)
REFERENCE_SETTINGS = [
    ("detect/voc07_vgg16.yaml", "model.allowed_border", 0, "py-faster-rcnn lib/rpn/anchor_target_layer.py"),
    ("detect/voc07_vgg16.yaml", "model.rpn_loss_beta", 1 / 9, "train.prototxt rpn_loss_bbox sigma 3"),
    ("detect/voc07_vgg16.yaml", "model.box_loss_beta", 1.0, "train.prototxt loss_bbox (sigma 1)"),
    ("detect/coco_vgg16.yaml", "model.allowed_border", 0, "py-faster-rcnn lib/rpn/anchor_target_layer.py"),
    ("detect/coco_vgg16.yaml", "model.rpn_loss_beta", 1 / 9, "train.prototxt rpn_loss_bbox sigma 3"),
    ("detect/coco_vgg16.yaml", "model.box_loss_beta", 1.0, "train.prototxt loss_bbox (sigma 1)"),
    ("detect/ssd300_voc0712.yaml", "model.frozen_stages", 0, "ssd_pascal.py: every layer trains"),
    ("detect/ssd300_voc0712.yaml", "model.clip_default_boxes", False, "ssd_pascal.py clip = False"),
    ("detect/ssd300_voc0712.yaml", "data.train_difficult", True, "ssd_pascal.py train_on_diff_gt = True"),
    ("reid/market1501_vgg16.yaml", "model.center_init", "randn", "layers/center_loss.py torch.randn"),
    ("reid/market1501_vgg16.yaml", "data.erasing_scale", [0.02, 0.4], "data/transforms/transforms.py sl, sh"),
    ("reid/market1501_vgg16.yaml", "data.pk_padding", "below_k", "data/samplers/triplet_sampler.py"),
    ("classify/imagenet_vgg16.yaml", "test_after_fit.ckpt", "last", "no checkpoint chosen on the reported split"),
    ("classify/imagenet_vgg16.yaml", "checkpoint.save_top_k", 0, "no checkpoint chosen on the reported split"),
]


@pytest.mark.parametrize(("recipe", "key", "value", "source"), REFERENCE_SETTINGS, ids=lambda v: str(v)[:40])
def test_recipes_set_the_references_values(recipe: str, key: str, value, source: str) -> None:
    cfg = yaml.safe_load((REPO / "configs" / recipe).read_text())
    got = _get(cfg, key)
    assert got == (pytest.approx(value) if isinstance(value, float) else value), f"{recipe} {key}: {source}"


@pytest.mark.parametrize("recipe", ["detect/voc07_vgg16.yaml", "detect/coco_vgg16.yaml", "segment/voc_fcn8s.yaml"])
def test_faster_rcnn_and_fcn_recipes_start_from_the_caffe_vgg16_as_their_references(recipe: str) -> None:
    text = (REPO / "configs" / recipe).read_text()
    assert str(_get(yaml.safe_load(text), "model.weights_backbone")).endswith("VGG_ILSVRC_16_layers.caffemodel")
    assert "IMAGENET1K_V1" in text  # the header names torchvision's weights as the alternative
