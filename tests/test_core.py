"""The shared training glue: schedules, parameter groups, atomic writes, the CLI's checkpoints,
empty batches, published metrics, checkpoints without pretrained weights, every shipped config."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tasks.core import (
    WEIGHTS_IN_CHECKPOINT,
    AtomicCheckpointIO,
    EvalReport,
    InferenceOptimization,
    OptimConfig,
    TaskModule,
    build_optimizer,
    gather_unique,
    lr_factor,
    publish_metrics,
)
from vggbackbone import VGGBackbone
from vggbackbone.utils import atomic_path, atomic_write

REPO = Path(__file__).resolve().parents[1]


def test_warmup_then_step_schedule() -> None:
    cfg = OptimConfig(scheduler="step", milestones=[0.5, 0.75], gamma=0.1, warmup_steps=10, warmup_factor=0.01)
    f = [lr_factor(s, 100, cfg) for s in range(100)]
    assert f[0] == pytest.approx(0.01)
    assert f[5] == pytest.approx(0.01 * 0.5 + 0.5)  # linear from 0.01 to 1
    assert f[10] == f[49] == 1.0
    assert f[50] == pytest.approx(0.1) and f[74] == pytest.approx(0.1)
    assert f[75] == pytest.approx(0.01) and f[99] == pytest.approx(0.01)


def test_cosine_schedule_reaches_min_ratio() -> None:
    cfg = OptimConfig(scheduler="cosine", min_lr_ratio=0.05, warmup_steps=0)
    assert lr_factor(0, 200, cfg) == pytest.approx(1.0)
    assert lr_factor(100, 200, cfg) == pytest.approx(0.05 + 0.95 * 0.5)
    assert lr_factor(200, 200, cfg) == pytest.approx(0.05)
    values = [lr_factor(s, 200, cfg) for s in range(201)]
    assert all(a >= b for a, b in itertools.pairwise(values))


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = VGGBackbone([(1, 8), (1, 8)], ["conv2"], batch_norm=True, frozen_stages=1)
        self.head = nn.Conv2d(8, 2, 1)


def test_param_groups_no_decay_backbone_mult_and_frozen() -> None:
    net = _Net()
    cfg = OptimConfig(name="sgd", lr=0.1, weight_decay=1e-4, backbone_lr_mult=0.1)
    opt, sched = build_optimizer(net, cfg, total_steps=10)
    seen = {id(p): g for g in opt.param_groups for p in g["params"]}
    names = dict(net.named_parameters())
    # frozen block 1 is not optimised at all
    assert not any(id(p) in seen for n, p in names.items() if n.startswith("backbone.features.conv1"))
    w = names["backbone.features.conv2.conv2_1.weight"]
    bn = names["backbone.features.conv2.bn2_1.weight"]
    bias = names["head.bias"]
    head_w = names["head.weight"]
    assert seen[id(w)]["weight_decay"] == 1e-4 and seen[id(w)]["lr"] == pytest.approx(0.01)
    assert seen[id(bn)]["weight_decay"] == 0.0 and seen[id(bn)]["lr"] == pytest.approx(0.01)
    assert seen[id(bias)]["weight_decay"] == 0.0 and seen[id(bias)]["lr"] == pytest.approx(0.1)
    assert seen[id(head_w)]["weight_decay"] == 1e-4
    assert isinstance(sched, torch.optim.lr_scheduler.LambdaLR)


def test_backbone_prefix_matches_whole_module_names() -> None:
    net = nn.ModuleDict({"backbone": nn.Linear(2, 2), "backbone_head": nn.Linear(2, 2)})
    opt, _ = build_optimizer(net, OptimConfig(lr=0.1, backbone_lr_mult=0.5, weight_decay=0.0), 1)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert all(lr_of[id(p)] == pytest.approx(0.05) for p in net["backbone"].parameters())
    assert all(lr_of[id(p)] == pytest.approx(0.1) for p in net["backbone_head"].parameters())


class _Task(TaskModule):
    def __init__(self) -> None:
        super().__init__()
        self.optim = OptimConfig(lr=0.1, backbone_lr_mult=0.1)
        self.model = _Net()
        self.log_calls: dict[str, float] = {}

    def log(self, name: str, value, **kwargs) -> None:  # record what would reach the loggers
        self.log_calls[name] = value


def test_zero_loss_reaches_every_trainable_parameter_with_zero_gradient() -> None:
    task = _Task()
    loss = task.zero_loss()
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    for name, p in task.named_parameters():
        if p.requires_grad:  # all-reduced by DDP like any other step's gradients
            assert p.grad is not None and not p.grad.any(), name
        else:  # frozen block 1
            assert p.grad is None, name


def test_publish_metrics_logs_writes_and_leaves_nan_out_of_the_loggers(tmp_path: Path) -> None:
    task = _Task()
    trainer = pl.Trainer(accelerator="cpu", logger=False, default_root_dir=tmp_path, enable_progress_bar=False)
    task.trainer = trainer
    seen: list[Path] = []

    def compute(log_dir: Path) -> EvalReport:
        seen.append(log_dir)
        return EvalReport({"score": 0.5, "IoU/absent": float("nan")}, extra={"curve": [1.0, float("nan")]})

    assert publish_metrics(task, "val", compute)["score"] == 0.5
    assert seen == [tmp_path] and task.log_calls == {"val/score": 0.5}  # NaN: not logged as a number
    out = json.loads((tmp_path / "val_metrics.json").read_text())  # strict JSON: NaN is null
    assert out == {"stage": "val", "epoch": 0, "global_step": 0, "score": 0.5, "IoU/absent": None, "curve": [1.0, None]}
    task.metrics_file = None
    publish_metrics(task, "test", compute)
    assert not (tmp_path / "test_metrics.json").exists()


def test_everything_frozen_is_a_clear_error() -> None:
    net = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(net, OptimConfig(), 1)


def test_gather_unique_single_process_keeps_first() -> None:
    assert gather_unique({1: "a", 2: "b"}) == {1: "a", 2: "b"}


_GATHER_WORKER = """
import json, sys
import torch.distributed as dist
from tasks.distributed import all_gather_objects, gather_unique, is_global_zero

rank, store, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
# key 0 on both ranks (a padded sampler's repeat), with a different value on each
merged = gather_unique({0: f"rank{rank}", 10 + rank: f"own{rank}"})
gathered = all_gather_objects(rank * 100)
result = {"merged": {str(k): v for k, v in merged.items()}, "order": list(merged), "gathered": gathered,
          "zero": is_global_zero()}
with open(f"{out}.{rank}", "w") as f:
    json.dump(result, f)
dist.destroy_process_group()
"""


def test_gather_unique_two_processes_keeps_the_first_rank() -> None:
    """Two real gloo processes: a key both ranks hold keeps rank 0's value, on every rank."""
    import json
    import os
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "worker.py"
        script.write_text(_GATHER_WORKER)
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        procs = [
            subprocess.Popen([sys.executable, str(script), str(r), f"{tmp}/store", f"{tmp}/out"], env=env)
            for r in range(2)
        ]
        try:
            codes = [p.wait(timeout=120) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        assert codes == [0, 0]
        results = [json.loads(Path(f"{tmp}/out.{r}").read_text()) for r in range(2)]
    for r, res in enumerate(results):
        assert res["merged"] == {"0": "rank0", "10": "own0", "11": "own1"}, f"rank {r}"
        assert res["order"] == [0, 10, 11] and res["gathered"] == [0, 100]
        assert res["zero"] == (r == 0)


def test_atomic_write_keeps_old_file_on_crash(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_write(target, "w") as f:
        f.write("half of the new")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temp file left behind
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"
    assert oct(os.stat(target).st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_atomic_checkpoint_io_never_leaves_a_partial_checkpoint(tmp_path: Path, monkeypatch) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}

    def exploding_save(obj, f, *a, **k):  # a crash half-way through torch.save
        Path(f).write_bytes(b"\x80partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", exploding_save)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


_TOY = textwrap.dedent(
    """
    import json, os
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset
    from tasks.core import OptimConfig, TaskDataModule, TaskModule, cli_main

    class Toy(TaskModule):
        def __init__(self, width: int = 4, note: str = "trained", weights_backbone: str | None = None,
                     optim: OptimConfig = OptimConfig(scheduler="none")):
            super().__init__()
            self.save_hyperparameters()
            self.optim = optim
            self.model = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                       nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 2))

        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.model(x), y)

        def validation_step(self, batch, _):
            # a metric that gets *worse* every epoch, so "best" stays at epoch 0
            self.log("val/score", -float(self.current_epoch), sync_dist=True)
            with open(os.environ["TOY_NOTE"], "w") as f:
                json.dump({"note": self.hparams.note, "width": self.hparams.width,
                           "weights": self.hparams.weights_backbone}, f)

    class ToyData(TaskDataModule):
        def __init__(self, batch_size: int = 4):
            super().__init__(batch_size=batch_size, num_workers=0)
            g = torch.Generator().manual_seed(0)
            self.x = torch.rand(16, 3, 8, 8, generator=g)
            self.y = (self.x[:, 0].mean((1, 2)) > 0.5).long()

        def train_dataloader(self):
            return self.make_loader(TensorDataset(self.x, self.y), train=True)

        def val_dataloader(self):
            return self.make_loader(TensorDataset(self.x, self.y), train=False)

    if __name__ == "__main__":
        cli_main(Toy, ToyData, task="toy", monitor=("val/score", "max"))
    """
)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, str]]:
    """A 3-epoch fit of a toy task through the real CLI: (script, run folder, env)."""
    tmp = tmp_path_factory.mktemp("toy")
    script = tmp / "toy.py"
    script.write_text(_TOY)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TOY_NOTE=str(tmp / "note.json"))  # fmt: skip
    root = tmp / "run"
    _toy(script, env, "fit", "--model.width", "6", "--model.note", "trained", "--trainer.max_epochs", "3",
         "--model.weights_backbone", "imagenet.pth", "--trainer.default_root_dir", str(root))  # fmt: skip
    return script, root, env


def _toy(script: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    common = ["--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false"] if args[0] != "export" else []
    proc = subprocess.run([sys.executable, str(script), *args, *common], cwd=script.parent, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_cli_keeps_best_and_true_last_checkpoint(toy_run) -> None:
    script, root, _ = toy_run
    ckpts = root / "version_0" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["best-000.ckpt", "last.ckpt"]
    last = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=False)
    best = torch.load(ckpts / "best-000.ckpt", map_location="cpu", weights_only=False)
    assert last["epoch"] == 2 and best["epoch"] == 0  # last is the latest epoch, not the best one
    assert (root / "csv" / "version_0" / "metrics.csv").is_file()  # loggers followed default_root_dir
    assert not (script.parent / "runs").exists()
    assert math.isfinite(float(last["state_dict"]["model.0.weight"].sum()))
    # the pretrained weights are not needed to rebuild from a checkpoint: its state dict replaces them
    assert last["hyper_parameters"]["note"] == "trained"
    assert last["hyper_parameters"]["weights_backbone"] == WEIGHTS_IN_CHECKPOINT


def test_explicit_model_arguments_win_over_the_checkpoint(toy_run) -> None:
    """Lightning 2.6 lets checkpoint hparams override the command line; ours does not."""
    script, root, env = toy_run
    ckpt = str(root / "version_0" / "checkpoints" / "last.ckpt")
    note = Path(env["TOY_NOTE"])
    _toy(script, env, "validate", "--ckpt_path", ckpt, "--trainer.default_root_dir", str(root / "v"))
    # from the checkpoint; its state dict replaces the pretrained weights, which are not fetched again
    assert json.loads(note.read_text()) == {"note": "trained", "width": 6, "weights": WEIGHTS_IN_CHECKPOINT}
    _toy(script, env, "validate", "--ckpt_path", ckpt, "--model.note", "given", "--trainer.default_root_dir",
         str(root / "v"), "--model.weights_backbone", "imagenet.pth")  # fmt: skip
    assert json.loads(note.read_text()) == {"note": "given", "width": 6, "weights": WEIGHTS_IN_CHECKPOINT}
    # a checkpoint that kept naming its weights (they bring their own input normalisation) keeps them
    kept = torch.load(ckpt, map_location="cpu", weights_only=False)
    kept["hyper_parameters"]["weights_backbone"] = "caffe.pth"
    torch.save(kept, root / "kept.ckpt")
    _toy(script, env, "validate", "--ckpt_path", str(root / "kept.ckpt"), "--trainer.default_root_dir", str(root / "v"),
         "--model.weights_backbone", "caffe.pth")  # fmt: skip
    assert json.loads(note.read_text())["weights"] == "caffe.pth"


def test_export_subcommand_writes_onnx_equal_to_the_model(toy_run) -> None:
    import onnxruntime as ort

    script, root, env = toy_run
    ckpt = root / "version_0" / "checkpoints" / "last.ckpt"
    out = root / "toy.onnx"
    proc = _toy(script, env, "export", "--ckpt", str(ckpt), "--out", str(out), "--height", "16", "--width", "20")
    assert "export:" in proc.stdout
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(6, 2))  # fmt: skip
    model.load_state_dict({k[len("model.") :]: v for k, v in state.items()})
    x = torch.rand(3, 3, 24, 28)  # another batch and size than the example: dynamic axes
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(y), model.eval()(x).detach(), rtol=1e-4, atol=1e-5)


class _PredictToy(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        with torch.no_grad():  # non-trivial statistics so folding has something to fold
            self.model[1].running_mean.uniform_(-1, 1)
            self.model[1].running_var.uniform_(0.5, 2)

    inference_model = TaskModule.inference_model

    def predict_step(self, batch, _):
        return type(self.inference_model).__name__, self.inference_model(batch[0])


@pytest.mark.parametrize("enabled", [True, False])
def test_inference_optimization_only_during_predict(enabled: bool) -> None:
    task = _PredictToy()
    x = torch.rand(4, 3, 10, 12)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[InferenceOptimization(enabled=enabled, precision="fp32")])  # fmt: skip
    ((name, y),) = trainer.predict(task, DataLoader(TensorDataset(x), batch_size=4))
    assert name == ("InferenceModule" if enabled else "Sequential")
    torch.testing.assert_close(y, task.model.eval()(x), rtol=1e-4, atol=1e-5)
    assert "_fast_model" not in task.__dict__ and task.inference_model is task.model
    assert all(k.startswith("model.") for k in task.state_dict())  # never registered as a submodule


def _tiny_task(task: str, weights: Path) -> TaskModule:
    from tasks.detect import DetectionTask
    from tasks.reid import ReIDTask
    from tasks.segment import SegmentationTask

    small = {"arch": "vgg11_bn", "width_mult": 0.125, "weights_backbone": str(weights)}
    if task == "detect":
        return DetectionTask(classes=["a", "b"], fpn=True, **small)
    if task == "segment":
        return SegmentationTask(num_classes=3, family="unet", decoder_channels=[16, 16, 8, 8, 8], **small)
    return ReIDTask(num_classes=4, **small)


@pytest.mark.parametrize("task", ["detect", "segment", "reid"])
def test_checkpoints_rebuild_without_the_pretrained_weights(task: str, tmp_path: Path) -> None:
    """weights_backbone (a file, or ImageNet weights to download) is not needed again to load a checkpoint."""
    weights = tmp_path / "pretrained.pth"
    torch.save(VGGBackbone("vgg11_bn", ["conv5"], width_mult=0.125).state_dict(), weights)
    module = _tiny_task(task, weights)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "task.ckpt")
    saved = torch.load(tmp_path / "task.ckpt", map_location="cpu", weights_only=False)["hyper_parameters"]
    assert saved["weights_backbone"] == WEIGHTS_IN_CHECKPOINT and saved["arch"] == "vgg11_bn"
    weights.unlink()  # gone, as ImageNet weights are on a machine without network
    loaded = type(module).load_from_checkpoint(tmp_path / "task.ckpt", map_location="cpu", weights_only=False)
    state = module.state_dict()
    assert loaded.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())
    # built as the pretrained model it was (a detector's frozen blocks and FrozenBatchNorm2d too)
    assert [type(m) for m in loaded.modules()] == [type(m) for m in module.modules()]
    assert [p.requires_grad for p in loaded.parameters()] == [p.requires_grad for p in module.parameters()]


@pytest.mark.parametrize("task", ["detect", "segment", "reid"])
def test_checkpoints_keep_weights_that_carry_their_own_normalisation(task: str, tmp_path: Path) -> None:
    """Built without weights a model takes ImageNet statistics; weights that expect other input
    (Caffe's 0-255 BGR means) stay named in the checkpoint, or the rebuilt model would be wrong."""
    weights = tmp_path / "caffe.pth"
    VGGBackbone("vgg11_bn", ["conv5"], width_mult=0.125, normalization="caffe").save_weights(weights)
    module = _tiny_task(task, weights)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "task.ckpt")
    saved = torch.load(tmp_path / "task.ckpt", map_location="cpu", weights_only=False)["hyper_parameters"]
    assert saved["weights_backbone"] == str(weights)
    loaded = type(module).load_from_checkpoint(tmp_path / "task.ckpt", map_location="cpu", weights_only=False)
    norm = loaded.get_submodule(loaded.backbone_path).normalization
    assert norm.name == "caffe" and norm == module.get_submodule(module.backbone_path).normalization


_TASK_OF = {"detect": "tasks.detect", "segment": "tasks.segment", "reid": "tasks.reid", "classify": "tasks.classify"}


@pytest.mark.parametrize(
    "config", sorted((REPO / "configs").glob("*/*.yaml")), ids=lambda p: f"{p.parent.name}/{p.stem}"
)
def test_every_shipped_config_parses(config: Path, capsys, monkeypatch) -> None:
    """Each config is valid for its task's CLI as shipped (the paper recipes need real data and GPUs to run)."""
    import importlib

    import yaml

    monkeypatch.setattr(sys, "argv", ["python -m tasks"])  # the CLI reads args=, not pytest's argv
    main = importlib.import_module(_TASK_OF[config.parent.name]).main
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(config), "--print_config"])
    assert done.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    shipped = yaml.safe_load(config.read_text())
    assert printed["model"]["arch"] == shipped.get("model", {}).get("arch", printed["model"]["arch"])
    for section in ("model", "data", "trainer"):  # what the file sets is what the CLI got
        for key, value in (shipped.get(section) or {}).items():
            if not isinstance(value, (dict, list)):
                assert printed[section][key] == value, f"{section}.{key}"


def test_list_images_folder_list_file_and_single_image(tmp_path: Path) -> None:
    from tasks.images import list_images, output_names

    for rel in ("b/x.jpg", "a/x.PNG", "c.tif", "notes.txt", "a/deeper/y.jpeg"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    names, files = list_images(tmp_path)  # recursive, sorted, images only
    assert names == ["a/deeper/y.jpeg", "a/x.PNG", "b/x.jpg", "c.tif"] and files[0] == tmp_path / "a/deeper/y.jpeg"
    assert output_names(names) == ["y", "a__x", "b__x", "c"]
    lst = tmp_path / "a" / "list.txt"
    lst.write_text(f"# comment\n\n  x.PNG  \n{tmp_path / 'b/x.jpg'}\n")
    assert list_images(lst) == (["x.PNG", str(tmp_path / "b/x.jpg")], [tmp_path / "a/x.PNG", tmp_path / "b/x.jpg"])
    assert list_images(tmp_path / "c.tif") == ([str(tmp_path / "c.tif")], [tmp_path / "c.tif"])
    assert output_names(["x.jpg", "x.png"]) == ["0_x", "1_x"]
    (tmp_path / "empty.txt").write_text("# nothing\n")
    (tmp_path / "none").mkdir()
    with pytest.raises(ValueError, match="empty.txt: no images found"):
        list_images(tmp_path / "empty.txt")
    with pytest.raises(ValueError, match="none: no images found"):
        list_images(tmp_path / "none")
    with pytest.raises(FileNotFoundError, match="gone.jpg: no such image"):
        list_images(tmp_path / "gone.jpg")
    with pytest.raises(FileNotFoundError, match="nowhere: no such image, folder or image list"):
        list_images(tmp_path / "nowhere")


def test_checkpoints_of_tasks_built_in_python_load_with_weights_only(tmp_path: Path) -> None:
    """Built in Python, hyper-parameters hold config dataclasses; weights_only loading must accept them."""
    from tasks.data.market import MarketConfig
    from tasks.data.shapes import ShapesConfig
    from tasks.reid import ReIDTask

    task = ReIDTask(arch="vgg11", width_mult=0.125, num_classes=3, optim=OptimConfig(name="adam", lr=1e-3))
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(task)
    trainer.save_checkpoint(tmp_path / "task.ckpt")
    loaded = ReIDTask.load_from_checkpoint(tmp_path / "task.ckpt", map_location="cpu", weights_only=True)
    assert loaded.optim == task.optim and isinstance(loaded.optim, OptimConfig)
    for k, v in task.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    data_hparams = {"shapes": ShapesConfig(num_train=3), "synthetic": MarketConfig(num_train_ids=2)}
    torch.save({"datamodule_hyper_parameters": data_hparams}, tmp_path / "data.ckpt")
    assert torch.load(tmp_path / "data.ckpt", weights_only=True)["datamodule_hyper_parameters"] == data_hparams
