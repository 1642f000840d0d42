"""No option is silently dropped: a misspelt detector argument, an unknown normalisation key
and LightningCLI's automatic ``--optimizer`` are errors naming the thing, in Python and the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vggbackbone.models import fasterrcnn_vgg, fcos_vgg, retinanet_vgg, ssd_vgg
from vggbackbone.weights import resolve_normalization

TINY = {"width_mult": 0.0625, "min_size": 64, "max_size": 96}


@pytest.mark.parametrize("fpn", [False, True])
def test_fasterrcnn_refuses_a_misspelt_argument_naming_it_and_the_accepted_ones(fpn: bool) -> None:
    # torchvision's FasterRCNN hands unknown **kwargs to GeneralizedRCNNTransform, which drops them
    with pytest.raises(ValueError, match=r"fasterrcnn_vgg: unknown argument\(s\) \['box_nms_tresh'\].*box_nms_thresh"):
        fasterrcnn_vgg("vgg11", num_classes=3, fpn=fpn, box_nms_tresh=0.3, **TINY)
    model = fasterrcnn_vgg("vgg11", num_classes=3, fpn=fpn, box_nms_thresh=0.3, size_divisible=16, **TINY)
    assert model.roi_heads.nms_thresh == 0.3 and model.transform.size_divisible == 16


def test_fasterrcnn_refuses_arguments_it_sets_itself() -> None:
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['image_mean'\]"):
        fasterrcnn_vgg("vgg11", num_classes=3, image_mean=[0.5, 0.5, 0.5], **TINY)


@pytest.mark.parametrize(
    ("builder", "typo"),
    [(retinanet_vgg, "score_tresh"), (fcos_vgg, "nms_tresh"), (ssd_vgg, "detections_per_image")],
)
def test_single_stage_detectors_refuse_a_misspelt_argument(builder, typo: str) -> None:
    kwargs = {"width_mult": 0.0625} if builder is ssd_vgg else TINY
    with pytest.raises(ValueError, match=rf"{builder.__name__}: unknown argument\(s\) \['{typo}'\]"):
        builder("vgg11", num_classes=3, **kwargs, **{typo: 0.3})


def test_normalization_dict_refuses_unknown_keys_and_0_255_means_without_a_space() -> None:
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['bgr'\]"):
        resolve_normalization({"mean": [0.5] * 3, "std": [0.5] * 3, "bgr": True})
    with pytest.raises(ValueError, match="space: bgr255"):
        resolve_normalization({"mean": [102.9801, 115.9465, 122.7717], "std": [1, 1, 1]})
    with pytest.raises(ValueError, match="space must be"):
        resolve_normalization({"mean": [0.5] * 3, "std": [0.5] * 3, "space": "bgr01"})


# ----------------------------------------------------------------------------- CLI
def _detect_config(tmp: Path, detector: dict) -> Path:
    cfg = {
        "trainer": {
            "accelerator": "cpu",
            "max_steps": 1,
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(tmp / "runs"),
        },
        "model": {"arch": "vgg11", "fpn": True, "anchor_sizes": [16, 32, 64, 128], "detector": detector, **TINY},
        "data": {
            "root": str(tmp / "shapes"),
            "shapes": {"num_train": 2, "num_val": 1, "min_image_size": 64, "max_image_size": 64, "seed": 1},
            "batch_size": 2,
            "num_workers": 0,
        },
    }
    path = tmp / "detect.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_cli_misspelt_detector_key_fails_naming_it(tmp_path) -> None:
    from tasks.detect import main

    cfg = _detect_config(tmp_path, {"box_nms_tresh": 0.3})
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['box_nms_tresh'\].*box_nms_thresh"):
        main(["fit", "--config", str(cfg)])
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.ckpt"))


def test_cli_has_no_automatic_optimizer_options(capsys) -> None:
    from tasks.segment import main

    with pytest.raises(SystemExit) as exit_help:
        main(["fit", "--help"])
    assert exit_help.value.code == 0
    help_text = capsys.readouterr().out
    assert "--model.optim" in help_text  # the one way to set the optimiser
    assert "--optimizer" not in help_text and "--lr_scheduler" not in help_text

    with pytest.raises(SystemExit) as exit_opt:
        main(["fit", "--optimizer", "SGD", "--optimizer.lr", "0.1"])
    assert exit_opt.value.code != 0
    assert "--optimizer" in capsys.readouterr().err
