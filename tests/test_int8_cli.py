"""int8 through the task CLIs: ``predict --inference.precision int8`` and ``extract --precision int8``.

Two ways on any CPU:

* the fallback: the CPU is made to report no int8 kernels at all (no VNNI/AMX and no AVX2), and
  the CLIs warn with the library's message and run fp32, equal to the plain model;
* int8 forced: the CPU is made to report AVX512-VNNI, so the CLIs calibrate on their images and
  quantise; oneDNN's int8 kernels run on AVX2 too (only slower). The quantised graphs run
  uncompiled (``quantize_int8(compile=False)``: the reference kernels, the numbers
  ``tests/test_int8.py`` checks the compiled path against), because inductor takes minutes on
  2 busy cores. Outputs must be within ``INT8_TOLERANCE`` of fp32 and *not* equal to them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from inference_probe import embed_directly, plain_reid_model, record_arg

from tasks.callbacks import InferenceOptimization
from vggbackbone import optimize as opt
from vggbackbone.deploy import hardware, inference
from vggbackbone.optimize import INT8_TOLERANCE

pytest.importorskip("torchao")

FALLBACK = r"precision='int8' falls back to fp32: this CPU has none of AMX-INT8, AVX512-VNNI, AVX-VNNI"


def _no_int8_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardware, "_cpuinfo_flags", lambda: frozenset({"sse4_2"}))
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")


@pytest.fixture()
def no_vnni(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_int8_kernels(monkeypatch)


@pytest.fixture()
def vnni(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """VNNI reported; quantisation uncompiled; returns the calibration batch counts seen."""
    monkeypatch.setattr(hardware, "_cpuinfo_flags", lambda: frozenset({"avx512_vnni"}))
    seen: list[int] = []
    real = opt.quantize_int8

    def uncompiled(model, calibration, targets=None, *, compile=True):
        batches = list(calibration)
        seen.append(len(batches))
        return real(model, batches, targets, compile=False)

    monkeypatch.setattr(inference, "quantize_int8", uncompiled)
    return seen


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _predict(run: dict[str, Path], name: str, *switch: str) -> dict:
    from tasks.reid import main

    record = run["tmp"] / f"int8_predict_{name}.pt"
    out = ["--writer.output_dir", str(run["tmp"] / f"int8_predict_{name}")]  # the embeddings file predict writes
    main(["predict", "--config", str(run["cfg"]), "--ckpt_path", str(run["ckpt"]), *switch, *out, record_arg(record)])
    return torch.load(record, weights_only=True)


def test_calibration_images_is_bounded() -> None:
    with pytest.raises(ValueError, match="calibration_images must be between 1 and 64, got 65"):
        InferenceOptimization(precision="int8", calibration_images=65)
    with pytest.raises(ValueError, match="got 0"):
        InferenceOptimization(precision="int8", calibration_images=0)


def test_predict_int8_falls_back_to_fp32_without_vnni(reid_run: dict[str, Path], no_vnni: None) -> None:
    with pytest.warns(UserWarning, match=FALLBACK):
        rec = _predict(reid_run, "fallback", "--inference.precision", "int8", "--inference.calibration_images", "4")
    assert rec["models"] == ["InferenceModule:fp32"]
    with torch.no_grad():
        want = plain_reid_model(reid_run["ckpt"])(rec["images"])
    assert float((rec["embeddings"] - want).abs().max()) <= 1e-4


def test_predict_int8_forced_is_within_tolerance_of_fp32(reid_run: dict[str, Path], vnni: list[int]) -> None:
    rec = _predict(reid_run, "forced", "--inference.precision", "int8", "--inference.calibration_images", "6")
    assert rec["models"] == ["InferenceModule:int8"]
    assert vnni == [6]  # 6 predict images, one calibration batch each
    with torch.no_grad():
        want = plain_reid_model(reid_run["ckpt"])(rec["images"]).numpy()
    got = rec["embeddings"].numpy()
    assert got.shape == want.shape and len(got) > 6
    cos = _cosines(got, want)
    assert cos.min() > INT8_TOLERANCE["embedding_cosine"], cos
    assert np.abs(got - want).max() > 1e-4  # really quantised, not fp32


def test_extract_int8_fallback_and_forced(reid_run: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks.reid import main
    from tasks.reid_extract import load_embeddings

    def extract(name: str) -> dict:
        out = reid_run["tmp"] / f"int8_extract_{name}.npz"
        record = reid_run["tmp"] / f"int8_extract_{name}.pt"
        main(["extract", "--ckpt", str(reid_run["ckpt"]), "--images", str(reid_run["images"]), "--out", str(out),
              "--batch_size", "4", "--num_workers", "0", "--precision", "int8", "--calibration_images", "5",
              record_arg(record)])  # fmt: skip
        d = load_embeddings(out)
        return {"emb": d["embeddings"], "models": torch.load(record, weights_only=True)["models"], "images": d["paths"]}

    _no_int8_kernels(monkeypatch)
    with pytest.warns(UserWarning, match=FALLBACK):
        fallback = extract("fallback")
    assert fallback["models"] == ["InferenceModule:fp32"]
    files = [reid_run["images"] / p for p in fallback["images"]]
    want = embed_directly(plain_reid_model(reid_run["ckpt"]), files)
    assert np.abs(fallback["emb"] - want).max() <= 1e-4

    monkeypatch.undo()
    seen: list[int] = []
    real = opt.quantize_int8
    monkeypatch.setattr(hardware, "_cpuinfo_flags", lambda: frozenset({"avx512_vnni"}))

    def uncompiled(m, cal, t=None, *, compile=True):
        seen.append(1)
        return real(m, cal, t, compile=False)

    monkeypatch.setattr(inference, "quantize_int8", uncompiled)
    forced = extract("forced")
    assert forced["models"] == ["InferenceModule:int8"] and seen == [1]
    cos = _cosines(forced["emb"], want)
    assert cos.min() > INT8_TOLERANCE["embedding_cosine"], cos
    assert np.abs(forced["emb"] - want).max() > 1e-4


def test_calibration_inputs_take_the_form_the_detector_forward_takes(tmp_path: Path, vnni: list[int]) -> None:
    """Detection predict: calibration is a list of [0, 1] images (any size) per batch, as the detector takes."""
    import pytorch_lightning as pl
    from PIL import Image

    from tasks.callbacks import calibration_inputs
    from tasks.data.detection import DetectionDataModule
    from tasks.detect import DetectionTask

    rng = np.random.default_rng(0)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, (h, w) in enumerate([(60, 80), (72, 64), (64, 64), (50, 90)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    (folder / "bad.jpg").write_bytes(b"")
    task = DetectionTask(classes=["a", "b"], arch="vgg11", width_mult=0.125, min_size=64, max_size=96)
    dm = DetectionDataModule(root=str(tmp_path), predict_images=str(folder), num_workers=0, batch_size=2)
    captured: dict[str, list] = {}

    class Capture(pl.Callback):
        def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            captured["inputs"] = calibration_inputs(trainer, pl_module, 64)

    callbacks = [Capture(), InferenceOptimization(precision="int8", calibration_images=3)]
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=callbacks)
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):  # reported once, by predict itself
        out = trainer.predict(task, datamodule=dm)
    inputs = captured["inputs"]
    assert len(inputs) == 4  # 5 images, the unreadable one passed over
    assert all(isinstance(x, list) and len(x) == 1 and x[0].dim() == 3 for x in inputs)
    assert {tuple(x[0].shape[1:]) for x in inputs} == {(60, 80), (72, 64), (64, 64), (50, 90)}
    assert all(float(x[0].min()) >= 0 and float(x[0].max()) <= 1 for x in inputs)
    assert vnni == [2]  # the callback's own: images 0, 2, 4 of the 5, the unreadable 4 passed over
    assert sum(len(b) for b in out) == 4


def test_inference_auto_considers_int8_only_with_calibration_images(monkeypatch, caplog) -> None:
    """``inference.precision: auto``: without ``calibration_images`` the library decides (no int8);
    with them, the real probe's choice among fp32 / bf16 / int8, logged with the times."""
    import logging
    from types import SimpleNamespace

    from vggbackbone.deploy import precision as precision_choice

    monkeypatch.setattr(precision_choice, "_probe_cache", {})
    monkeypatch.setattr(precision_choice, "_logged_choices", set())
    module = SimpleNamespace(device=torch.device("cpu"))
    assert InferenceOptimization(precision="auto")._auto_choice(module) == "auto"
    with caplog.at_level(logging.INFO, logger="vggbackbone.optimize"):
        choice = InferenceOptimization(precision="auto", calibration_images=4)._auto_choice(module)
    ((candidates, times),) = precision_choice._probe_cache.items()
    assert choice == min(times, key=times.__getitem__) and ("int8" in candidates) == opt.int8_supported()[0]
    assert f"precision='auto' picked {choice}" in caplog.text
    with pytest.raises(ValueError, match="needs inference.runtime: openvino"):
        InferenceOptimization(precision="default")
    with pytest.raises(ValueError, match="inference.compile does not apply"):
        InferenceOptimization(runtime="openvino", compile=True)
