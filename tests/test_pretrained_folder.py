"""``save_pretrained``/``from_pretrained`` folders (``config.json`` + ``model.safetensors``): a
round trip per task family from the checkpoint fixtures through ``python -m tasks.<task> export
--format pretrained``, outputs equal; the config names a registered builder and plain options only."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch
from cli_configs import REPO
from test_checkpoint_fixtures import TASKS, _task_class

from tasks.checkpoint import load_task
from vggbackbone.models import create_model, fcn_vgg, from_pretrained, save_pretrained

FIXTURES = REPO / "tests" / "fixtures" / "checkpoints"


def _same(a, b) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    else:
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("fixture", "family"),
    [("classify", "vgg"), ("detect_fasterrcnn", "fasterrcnn"), ("segment_unet", "unet"), ("reid", "reid_vgg")],
)
def test_export_pretrained_round_trip_per_task(tmp_path: Path, fixture: str, family: str) -> None:
    task = fixture.split("_")[0]
    main = importlib.import_module(TASKS[task].rsplit(".", 1)[0]).main
    out = tmp_path / "folder"
    main(["export", "--ckpt", str(FIXTURES / f"{fixture}.ckpt"), "--out", str(out), "--format", "pretrained"])
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert (config["model"], config["task"]) == (family, task)
    assert not {"weights", "weights_backbone"} & set(config["options"])
    expected = load_task(_task_class(fixture), FIXTURES / f"{fixture}.ckpt").model.eval()
    if task == "reid":  # the identity classifier of the training identities travels too
        assert config["options"]["num_classes"] == 4 and "metadata" in config
    else:
        assert (
            config["metadata"]["classes"]["names"]
            == load_task(_task_class(fixture), FIXTURES / f"{fixture}.ckpt").class_set().record()["names"]
        )
    rebuilt = from_pretrained(out)
    fixed = torch.load(FIXTURES / f"{fixture}.expected.pt", map_location="cpu", weights_only=True)["input"]
    with torch.no_grad():
        _same(rebuilt(fixed), expected(fixed))


def test_python_round_trip_keeps_the_caffe_normalization_and_tuples(tmp_path: Path) -> None:
    model = create_model(
        "fcn8s", arch="vgg11", num_classes=3, width_mult=0.0625, fc_channels=16, normalization="caffe"
    ).eval()
    save_pretrained(model, tmp_path / "fcn")
    rebuilt = from_pretrained(tmp_path / "fcn")
    assert rebuilt.normalization == model.normalization and rebuilt.normalization.name == "caffe"
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=0)
    det = create_model("fasterrcnn", arch="vgg11", num_classes=3, width_mult=0.0625, min_size=(48, 64), max_size=64)
    save_pretrained(det, tmp_path / "det")
    assert from_pretrained(tmp_path / "det").transform.min_size == (48, 64)


def test_refusals(tmp_path: Path) -> None:
    model = create_model("unet", arch="vgg11", num_classes=2, width_mult=0.0625).eval()
    folder = save_pretrained(model, tmp_path / "unet")
    config = json.loads((folder / "config.json").read_text())
    for change, message in [
        ({"model": "os.system"}, "unknown model 'os.system'; registered: fasterrcnn, "),
        ({"options": dict(config["options"], weights_backbone="/etc/x.pth")}, "'weights_backbone' would load weights"),
        ({"format": "other"}, "not a vggbackbone-pretrained config"),
    ]:
        bad = tmp_path / f"bad{len(message)}"
        bad.mkdir()
        (bad / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
        (bad / "config.json").write_text(json.dumps(dict(config, **change)))
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            from_pretrained(bad)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"user": "data"}')
    with pytest.raises(FileExistsError, match="is not a vggbackbone-pretrained config: not overwriting it"):
        save_pretrained(model, mine)
    assert (mine / "config.json").read_text() == '{"user": "data"}' and not (mine / "model.safetensors").exists()
    with pytest.raises(ValueError, match="was not built by vggbackbone.models.create_model: pass name="):
        save_pretrained(fcn_vgg("vgg11", num_classes=2, width_mult=0.0625), tmp_path / "direct")
    with pytest.raises(ValueError, match=r"option norm_layer = .* cannot be written as JSON"):
        save_pretrained(
            create_model("unet", arch="vgg11_bn", num_classes=2, width_mult=0.0625, norm_layer=torch.nn.BatchNorm2d),
            tmp_path / "callable",
        )
