"""Embeddings of many images: ``python -m tasks.reid extract --ckpt C --images DIR_OR_LIST --out F.npz``.

Runs Lightning's predict loop, so ``--trainer.devices 8 --trainer.strategy ddp`` spreads the
images over 8 processes exactly as training does. Each process streams its embeddings to a shard
beside the output (``.F.npz.parts/``), batch by batch; when all are done, global rank 0 merges
the shards, in input order, into the output file, chunk by chunk (memory stays flat however many
images), and renames it into place (atomic). An interrupted run keeps its shards: running the same
command again (same checkpoint, same image list) only embeds the images not done yet.

Every file written (shards, the ``.npz``) is recorded in ``.F.npz.manifest.json`` beside the output
(:meth:`tasks.outputs.OutputFolder.beside`): a new extraction removes only what an earlier one
recorded, never overwrites a file no manifest lists, refuses an output among its input images,
and fails when no image could be read.

Output, a NumPy ``.npz`` (``np.load(path)``, or :func:`load_embeddings`):

* ``embeddings``: ``(N, D)`` float32, row ``i`` the embedding of ``paths[i]`` (as the model's
  eval forward returns it: post-BNNeck, L2-normalised by default);
* ``paths``: ``(N,)`` str, the image paths in input order (relative to the folder for a folder
  input, as written in the list for a list input);
* ``skipped_paths``, ``skipped_reasons``: ``(M,)`` str, images that could not be read (counted
  in a warning, never embedded).

Input (:func:`tasks.images.list_images`): a folder (searched recursively for images, sorted), a
text file with one image path per line (relative paths are relative to the list's folder; blank
lines and ``#`` comments ignored), or one image.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from tasks.callbacks import InferenceOptimization
from tasks.checkpoint import load_task, read_checkpoint
from tasks.distributed import all_gather_objects
from tasks.embeddings_file import Shard, check_finite, load_embeddings, merge_shards, read_skips, record_dtype
from tasks.images import ImageListDataset, SkippedSample, list_images
from tasks.module import TaskModule
from tasks.outputs import OutputFolder, input_paths, require_some
from vggbackbone.deploy import default_precision

__all__ = ["extract_embeddings", "extract_main", "load_embeddings", "merge_shards"]


# ---------------------------------------------------------------------------- inputs
def _indexed(index: int, sample: dict[str, Any] | SkippedSample) -> tuple[int, Tensor | SkippedSample]:
    """``(index in the full list, image or SkippedSample)``: a shard records skips by index too."""
    return index, sample if isinstance(sample, SkippedSample) else sample["image"]


def _images(files: list[Path], size: tuple[int, int], indices: Sequence[int], draft: bool) -> ImageListDataset:
    """The images still to embed (:class:`tasks.images.ImageListDataset`), resized to ``size``; with
    ``draft``, JPEGs are decoded at the smallest DCT scale still at least ``size``."""
    transform = v2.Compose([v2.Resize(size, antialias=True), v2.ToDtype(torch.float32, scale=True)])
    return ImageListDataset(files, transform=transform, indices=indices, draft=size if draft else None, item=_indexed)


def _collate(items: list[tuple[int, Any]]) -> dict[str, Any]:
    good = [(i, x) for i, x in items if isinstance(x, Tensor)]
    return {
        "image": torch.stack([x for _, x in good]) if good else torch.empty(0),
        "index": torch.tensor([i for i, _ in good], dtype=torch.long),
        "skipped": [(i, x.reason) for i, x in items if isinstance(x, SkippedSample)],
    }


class _EmbedModule(TaskModule):
    """Wraps a plain ``nn.Module`` (eval forward = embeddings) for Lightning's predict loop."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.model = net

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        emb = self.inference_model(batch["image"]) if batch["image"].numel() else None
        return {"index": batch["index"], "embedding": emb, "skipped": batch["skipped"]}


class _ExtractData(pl.LightningDataModule):
    """Images still to embed. ``setup`` runs once the processes exist: rank 0 keeps the shards of
    an earlier run of the same extraction (``fingerprint``) or removes what an earlier run recorded
    (:meth:`tasks.outputs.OutputFolder.begin`), then every rank reads which images are done."""

    def __init__(self, names: list[str], files: list[Path], outputs: OutputFolder, inputs: list[Path],
                 fingerprint: dict[str, Any], image_size: tuple[int, int], batch_size: int,
                 num_workers: int) -> None:  # fmt: skip
        super().__init__()
        self.names, self.files, self.outputs, self.inputs = names, files, outputs, inputs
        self.fingerprint = fingerprint
        self.image_size, self.batch_size, self.num_workers = image_size, batch_size, num_workers
        self.attempt = 0
        self.resumed = 0
        self.embedded_before = 0  # images an earlier attempt embedded
        self.skipped_before: list[tuple[int, str]] = []  # and those it could not read
        self.draft_decode = bool(fingerprint.get("draft_decode", False))

    def setup(self, stage: str) -> None:
        out = self.outputs.output
        self.outputs.begin(inputs=self.inputs, expected=[out.name], resume_key=self.fingerprint)
        self.attempt = self.outputs.attempt
        done = np.zeros(len(self.names), bool)
        embedded = np.zeros(len(self.names), bool)
        skips: dict[int, str] = {}
        for rel in self.outputs.known_files():
            path = self.outputs.folder / rel
            if path.suffix == ".rec" and path.is_file():
                embedded[Shard(path).indices()] = True
            elif path.suffix == ".skip" and path.is_file():
                skips.update(read_skips(path))
        done[list(skips)] = True
        done |= embedded
        self.resumed, self.embedded_before = int(done.sum()), int(embedded.sum())
        self.skipped_before = sorted(skips.items())
        self.todo = np.flatnonzero(~done)

    def _dataset(self, indices: Sequence[int]) -> ImageListDataset:
        return _images(self.files, tuple(self.image_size), indices, self.draft_decode)  # type: ignore[arg-type]

    def calibration_set(self, num_images: int) -> ImageListDataset:
        """int8 calibration images (:func:`tasks.callbacks.calibration_inputs`): ``num_images``
        spread evenly over the *whole* list, so a resumed run calibrates on the same images."""
        n = len(self.files)
        return self._dataset(np.unique(np.linspace(0, n - 1, min(num_images, n)).round().astype(int)).tolist())

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(
            self._dataset(self.todo),
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=_collate,
            persistent_workers=False,
            pin_memory=torch.cuda.is_available(),
        )


class _ShardWriter(BasePredictionWriter):
    """Appends each batch's ``(index, embedding)`` records to this rank's shard, then (rank 0,
    after every rank is done) merges the shards into the output file."""

    def __init__(self, data: _ExtractData, out: Path) -> None:
        super().__init__(write_interval="batch")
        self.data, self.out = data, out
        self.parts = f".{out.name}.parts"  # the shards' folder, relative to the output's
        self.rec_file: Any = None
        self.skip_file: Any = None
        self.merged = False
        self.embedded = 0  # this process, this attempt
        self.skipped: list[tuple[int, str]] = []

    def _prefix(self, trainer: pl.Trainer) -> str:
        return f"{self.parts}/a{self.data.attempt}-r{trainer.global_rank}"

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx
    ) -> None:  # type: ignore[override]
        if prediction["skipped"]:
            self.skipped += prediction["skipped"]
            if self.skip_file is None:  # closed in _close
                self.skip_file = self.data.outputs.open_append(
                    f"{self._prefix(trainer)}.skip", "a", encoding="utf-8", errors="surrogateescape"
                )
            self.skip_file.write("".join(f"{i}\t{r}\n" for i, r in prediction["skipped"]))
            self.skip_file.flush()
        emb = prediction["embedding"]
        if emb is None or emb.numel() == 0:
            return
        emb = emb.detach().float().cpu().numpy()
        check_finite(emb, [self.data.names[int(i)] for i in prediction["index"]], "extract")
        if self.rec_file is None:  # kept open across batches, closed in _close
            self.rec_file = self.data.outputs.open_append(f"{self._prefix(trainer)}-d{emb.shape[1]}.rec")
        rec = np.empty(len(emb), record_dtype(emb.shape[1]))
        rec["index"] = prediction["index"].cpu().numpy()
        rec["embedding"] = emb
        self.rec_file.write(rec.tobytes())
        self.rec_file.flush()
        self.embedded += len(emb)

    def _close(self) -> None:
        for f in (self.rec_file, self.skip_file):
            if f is not None:
                f.close()
        self.rec_file = self.skip_file = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close()  # the shards stay: running the same extraction again resumes from them
        self.data.outputs.close()

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        report = getattr(pl_module, "predict_skipped", None)  # the task counted the skips too: they are
        if callable(report):  # reported here, by name, once merged (merge_shards), not as indices by the task
            report(warn=False)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.merge(trainer.global_rank)

    def merge(self, rank: int) -> None:
        """Every process: check something was embedded; rank 0 merges the shards into the output,
        then removes them (the files recorded, then their folder); the manifest is completed."""
        self._close()
        outputs, names = self.data.outputs, self.data.names
        embedded = sum(all_gather_objects(self.embedded)) + self.data.embedded_before
        skip_lists = [self.data.skipped_before, *all_gather_objects(self.skipped)]
        skipped = [SkippedSample(names[i], r) for part in skip_lists for i, r in part]
        require_some(embedded, "extract", f"{len(names)} image(s)", skipped, on_error=outputs.close)
        shards = [f for f in outputs.recorded() if f.startswith(f"{self.parts}/")]  # a collective
        error: BaseException | None = None
        if rank == 0:
            try:
                merge_shards(outputs.folder / self.parts, self.out, names,
                             files=[outputs.folder / f for f in shards], outputs=outputs)  # fmt: skip
                for f in shards:
                    outputs.discard(f)
            except Exception as e:  # every process raises it, none waits forever
                error = e
        shared = all_gather_objects(error)[0]
        if shared is not None:
            outputs.close()
            raise shared if rank == 0 else RuntimeError(f"extract: global rank 0 failed: {shared}")
        outputs.finish(remove_dirs=[self.parts])
        self.merged = True


# ---------------------------------------------------------------------------- entry points
def _load_model(
    model: Any, task_class: type[pl.LightningModule] | None
) -> tuple[pl.LightningModule, dict[str, Any], tuple[int, int] | None]:
    """``(module, fingerprint, image size from the checkpoint)`` for a path, a ReIDTask or an nn.Module."""
    if isinstance(model, (str, Path)):
        ckpt = Path(model)
        if not ckpt.is_file():
            raise FileNotFoundError(f"{ckpt}: checkpoint not found")
        if task_class is None:
            raise TypeError(
                f"{model}: a checkpoint needs its task class: use tasks.reid.extract_embeddings, or pass task_class="
            )
        raw = read_checkpoint(ckpt)  # safely, errors naming the file and what it holds
        size = (raw.get("datamodule_hyper_parameters") or {}).get("image_size")
        task = load_task(task_class, ckpt)
        st = ckpt.stat()
        fp = {"model": str(ckpt.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        return task, fp, tuple(size) if size else None
    module = model if isinstance(model, pl.LightningModule) else _EmbedModule(model)
    h = hashlib.sha1()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().numpy().tobytes())
    return module, {"model": type(model).__name__, "weights_sha1": h.hexdigest()}, None


def extract_embeddings(
    model: str | Path | nn.Module,
    images: str | Path | Sequence[str | Path],
    out: str | Path,
    *,
    image_size: tuple[int, int] | None = None,
    batch_size: int = 128,
    num_workers: int = 2,
    trainer: pl.Trainer | dict[str, Any] | None = None,
    optimize: bool = True,
    precision: str = "auto",
    task_class: type[pl.LightningModule] | None = None,
    calibration_images: int = 32,
    draft_decode: bool = False,
) -> Path:
    """Embed ``images`` with ``model`` into ``out`` (``.npz``, see the module doc); return ``out``.

    Args:
        model: a checkpoint of ``python -m tasks.reid fit`` (with ``task_class``; or call
            :func:`tasks.reid.extract_embeddings`, which passes it), a ``ReIDTask``, or any
            ``nn.Module`` whose eval forward maps ``(N, 3, H, W)`` images in ``[0, 1]`` to
            ``(N, D)`` (a :class:`~vggbackbone.models.ReIDNet`).
        images: a folder, an image-list file, or a sequence of paths.
        out: the output ``.npz``.
        image_size: ``(height, width)`` images are resized to; default: the checkpoint's
            training size (required for a plain module).
        batch_size, num_workers: loader settings per process.
        trainer: a ``pl.Trainer`` or its keyword arguments (``devices``, ``strategy``,
            ``accelerator``, ``precision``...); default: one device, no logger.
        optimize: run the model through :func:`vggbackbone.optimize_for_inference` (BatchNorm
            folded, channels_last; same embeddings within 1e-4 in fp32).
        precision: ``auto`` (bf16 on CUDA and on CPUs with AMX/AVX512-BF16, fp32 elsewhere:
            :func:`vggbackbone.optimize.default_precision`), ``fp32``, ``bf16``, ``fp16`` or
            ``int8`` (CPU: calibrated on ``calibration_images`` of ``images``, spread over the
            list; fp32 with a warning on a CPU without VNNI/AMX). Reduced precision changes
            embeddings by up to :data:`vggbackbone.optimize.RELATIVE_TOLERANCE` (relative to the
            largest value; int8: cosine similarity to fp32 above
            :data:`vggbackbone.optimize.INT8_TOLERANCE` ``["embedding_cosine"]`` on the tested
            models); pass ``fp32`` for embeddings that match the plain model on any machine.
        task_class: the ``LightningModule`` class a checkpoint ``model`` is loaded with.
        calibration_images: images int8 calibrates on (1 to 64).
        draft_decode: decode JPEGs at least twice ``image_size`` at 1/2, 1/4 or 1/8 scale
            (:func:`tasks.images.draft_decode`): faster on large photos, but not the pixels the
            model was trained and validated on (full decode, then an antialiased resize): on the
            ReID demo (64x32 from 128x64 crops) embeddings moved to cosine 0.97 on average (0.80
            at worst) from the full decode's. Off by default.
    """
    out = Path(out)
    if out.suffix != ".npz":
        raise ValueError(f"{out}: the output must be a .npz file")
    module, fingerprint, ckpt_size = _load_model(model, task_class)
    size = tuple(image_size) if image_size is not None else ckpt_size
    if size is None:
        raise ValueError("image_size is required when the model is not a checkpoint that records it")
    names, files = list_images(images)
    if not isinstance(trainer, pl.Trainer):
        kwargs = {"logger": False, "enable_checkpointing": False, "enable_model_summary": False} | dict(trainer or {})
        trainer = pl.Trainer(**kwargs)
    if precision == "auto":  # resolved here, so shards of a resumed run never mix precisions
        precision = default_precision(trainer.strategy.root_device) if optimize else "fp32"
    fingerprint |= {
        "images_sha1": hashlib.sha1(b"\n".join(os.fsencode(f) for f in files)).hexdigest(),  # names as bytes
        "num_images": len(files),
        "image_size": list(size),
        "precision": precision if optimize else "fp32 (not optimised)",
    }
    if draft_decode:  # other pixels, other embeddings: no mixing on resume
        fingerprint["draft_decode"] = True
    if optimize and precision == "int8":  # another calibration gives other embeddings: no mixing on resume
        fingerprint["calibration_images"] = calibration_images
    outputs = OutputFolder.beside(out, "reid extract")
    inputs = input_paths(images) if isinstance(images, (str, Path)) else files
    data = _ExtractData(names, files, outputs, inputs, fingerprint, size, batch_size, num_workers)  # type: ignore[arg-type]
    writer = _ShardWriter(data, out)
    # calibration images only for int8: with them, precision auto could pick int8, which the
    # resume fingerprint above does not record
    calibration = calibration_images if precision == "int8" else None
    optimization = InferenceOptimization(enabled=optimize, precision=precision, calibration_images=calibration)  # type: ignore[arg-type]
    trainer.callbacks += [optimization, writer]  # type: ignore[arg-type]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*Total length of .* across ranks is zero.*")
        trainer.predict(module, datamodule=data, return_predictions=False)
    if trainer.is_global_zero and data.resumed:
        print(f"extract: resumed, {data.resumed} of {len(names)} images were done by an earlier run")
    if not writer.merged:  # nothing was left to embed (resumed run): no predict loop ran
        writer.merge(trainer.global_rank)
    return out


def extract_main(argv: list[str], task_class: type[pl.LightningModule]) -> Path:
    """``python -m tasks.reid extract --ckpt C --images DIR_OR_LIST --out F.npz [--trainer.* ...]``."""
    from pytorch_lightning.cli import LightningArgumentParser

    parser = LightningArgumentParser(prog="python -m tasks.reid extract", description=__doc__)
    parser.add_argument("--ckpt", required=True, help="checkpoint written by `python -m tasks.reid fit`")
    parser.add_argument("--images", required=True, help="a folder of images or a text file listing them")
    parser.add_argument("--out", required=True, help="output .npz (embeddings, paths, skipped_paths, skipped_reasons)")
    parser.add_argument(
        "--image_size", type=tuple[int, int] | None, default=None, help="height width (default: the checkpoint's)"
    )
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument(
        "--optimize", type=bool, default=True, help="BN folding + channels_last (optimize_for_inference)"
    )
    parser.add_argument(
        "--precision", type=str, default="auto", help="auto, fp32, bf16, fp16 or int8 for the optimised model"
    )
    parser.add_argument(
        "--calibration_images",
        type=int,
        default=32,
        help="int8: images (1-64) spread over --images that calibrate the activation ranges",
    )
    parser.add_argument(
        "--draft_decode",
        type=bool,
        default=False,
        help="decode large JPEGs at 1/2, 1/4, 1/8 scale (faster; slightly other pixels than training saw)",
    )
    parser.add_lightning_class_args(pl.Trainer, "trainer")
    parser.set_defaults(
        {"trainer.logger": False, "trainer.enable_checkpointing": False, "trainer.enable_model_summary": False}
    )
    cfg = parser.instantiate_classes(parser.parse_args(argv))  # builds --trainer.callbacks etc.
    return extract_embeddings(
        cfg.ckpt,
        cfg.images,
        cfg.out,
        image_size=cfg.image_size,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        trainer=cfg.trainer.as_dict(),
        optimize=cfg.optimize,
        precision=cfg.precision,
        task_class=task_class,
        calibration_images=cfg.calibration_images,
        draft_decode=cfg.draft_decode,
    )
