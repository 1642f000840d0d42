"""Person re-identification on VGG: ``ReIDNet`` and its builder ``reid_vgg``.

The "strong baseline" head (Luo et al., "Bag of Tricks and A Strong Baseline for Deep Person
Re-identification", CVPRW 2019) on a VGG trunk::

    image (N,3,H,W) in [0,1] ─▶ normalise ─▶ VGGBackbone conv5 (N,C,H/16,W/16; H/8 when dilated)
        ─▶ pool (avg | max | GeM) ─▶ [reduction: Linear C->D] ─▶ feature f (N,D)   "pre-BN"
        ─▶ BNNeck (BatchNorm1d, bias frozen) ─▶ embedding e (N,D)                    "post-BN"
        ─▶ classifier (Linear D->num_classes, no bias) ─▶ logits

Training returns ``ReIDOutput(logits, features)``: the identity loss reads the logits, the
metric (triplet) loss the pre-BN features. Evaluation returns the embedding ``e`` (L2
normalised when ``normalize=True``), the vector compared with cosine/euclidean distances.
:class:`CenterLoss` is the strong baseline's optional third loss, on the same features.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..vgg import ArchSpec, VGGBackbone
from .core import NormalizingModel, build_trunk, check_num_classes
from .registry import BUILD_CONFIG_ATTR

__all__ = ["CenterLoss", "GeM", "ReIDNet", "ReIDOutput", "reid_vgg"]


class ReIDOutput(NamedTuple):
    """Training output of :class:`ReIDNet`.

    ``logits``: ``(N, num_classes)`` (``None`` when the net has no classifier);
    ``features``: ``(N, D)`` pooled features before the BNNeck (for metric losses).
    """

    logits: Tensor | None
    features: Tensor


class GeM(nn.Module):
    """Generalised-mean pooling (Radenović et al. 2018) with a learnable exponent ``p``.

    ``(N, C, H, W) -> (N, C)``: ``(mean(clamp(x, eps) ** p)) ** (1 / p)``; ``p=1`` is average
    pooling and ``p -> inf`` tends to max pooling. torch has no GeM layer, hence this one.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6, learnable: bool = True) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)), requires_grad=learnable)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        p = self.p.clamp(min=1.0)
        return x.clamp(min=self.eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)

    def extra_repr(self) -> str:
        return f"p={float(self.p):.3f}, eps={self.eps}"


class _GlobalPool(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "max":
            return x.amax(dim=(-2, -1))
        return x.mean(dim=(-2, -1))

    def extra_repr(self) -> str:
        return self.kind


class ReIDNet(NormalizingModel):
    """Backbone -> pooling -> optional reduction -> BNNeck -> classifier.

    Args:
        backbone: a :class:`~vggbackbone.VGGBackbone` whose last returned tap is the feature map
            to pool (``reid_vgg`` asks for ``conv5``, or the last block of a custom arch).
        num_classes: training identities; ``0`` builds no classifier (an embedding-only model,
            e.g. for extraction). :meth:`reset_classifier` changes it later.
        pooling: ``"avg"``, ``"max"`` or ``"gem"`` (learnable exponent).
        gem_p: initial GeM exponent.
        embedding_dim: ``None`` keeps the backbone's channels; an int adds a bias-free
            ``Linear(C, embedding_dim)`` reduction before the BNNeck.
        bnneck: put a BatchNorm1d (bias frozen at 0, as in the strong baseline) between the
            feature and the classifier; ``False`` uses the feature directly.
        normalize: L2-normalise the evaluation embedding.

    Input: ``(N, 3, H, W)`` RGB in ``[0, 1]``; the backbone's :attr:`normalization` is applied
    here, so callers never hard-code mean/std.
    """

    def __init__(
        self,
        backbone: VGGBackbone,
        num_classes: int = 0,
        *,
        pooling: Literal["avg", "max", "gem"] = "gem",
        gem_p: float = 3.0,
        embedding_dim: int | None = None,
        bnneck: bool = True,
        normalize: bool = True,
    ) -> None:
        super().__init__(backbone.normalization)
        if pooling not in ("avg", "max", "gem"):
            raise ValueError(f"pooling must be 'avg', 'max' or 'gem', got {pooling!r}")
        self.backbone = backbone
        self.tap = next(reversed(backbone.return_layers.values()))
        self.pool: nn.Module = GeM(gem_p) if pooling == "gem" else _GlobalPool(pooling)
        channels = backbone.out_channels
        if embedding_dim is not None:
            self.reduction: nn.Module = nn.Linear(channels, embedding_dim, bias=False)
            nn.init.kaiming_normal_(self.reduction.weight, mode="fan_out")
            channels = embedding_dim
        else:
            self.reduction = nn.Identity()
        self.embedding_dim = channels
        self.neck: nn.Module = nn.BatchNorm1d(channels) if bnneck else nn.Identity()
        if bnneck:
            self.neck.bias.requires_grad_(False)  # the strong baseline's BNNeck: no shift
        self.normalize = normalize
        self.classifier: nn.Module = nn.Identity()
        self.num_classes = 0
        self.reset_classifier(num_classes)

    def reset_classifier(self, num_classes: int) -> None:
        """(Re)build the identity classifier for ``num_classes`` identities (0 removes it)."""
        self.num_classes = check_num_classes(num_classes, 0, "ReIDNet")
        build = getattr(self, BUILD_CONFIG_ATTR, None)
        if build is not None:  # what save_pretrained writes: the classifier it has now
            build["options"]["num_classes"] = self.num_classes
        if num_classes == 0:
            self.classifier = nn.Identity()
            return
        ref = self.mean  # build on the model's current device
        self.classifier = nn.Linear(self.embedding_dim, num_classes, bias=False, device=ref.device)
        nn.init.normal_(self.classifier.weight, std=0.001)

    def forward_features(self, x: Tensor) -> Tensor:
        """``(N, 3, H, W)`` in ``[0, 1]`` -> pre-BNNeck feature ``(N, D)``."""
        fmap = self.backbone(self.normalize_input(x))[self.tap]
        return self.reduction(self.pool(fmap))

    def forward(self, x: Tensor) -> ReIDOutput | Tensor:
        """Training: :class:`ReIDOutput` ``(logits (N, K), features (N, D))``.
        Eval: embedding ``(N, D)``, L2-normalised when ``normalize``."""
        feat = self.forward_features(x)
        emb = self.neck(feat)
        if self.training:
            logits = self.classifier(emb) if self.num_classes > 0 else None
            return ReIDOutput(logits, feat)
        return F.normalize(emb, dim=1) if self.normalize else emb


def reid_vgg(
    arch: ArchSpec = "vgg16",
    num_classes: int = 0,
    *,
    weights_backbone: str | Path | None = None,
    output_stride: int | None = None,
    pooling: Literal["avg", "max", "gem"] = "gem",
    gem_p: float = 3.0,
    embedding_dim: int | None = None,
    bnneck: bool = True,
    normalize: bool = True,
    normalization: Any = None,
    **backbone_kwargs: Any,
) -> ReIDNet:
    """A :class:`ReIDNet` on ``VGGBackbone(arch)``'s last conv block (``conv5`` for paper archs).

    Args:
        arch: any :class:`~vggbackbone.VGGBackbone` arch (``"vgg16"``, ``"vgg11_bn"``, a block spec).
        num_classes: training identities (0: no classifier).
        weights_backbone: backbone weights (path or torchvision weights name), see VGGBackbone.
        output_stride: stride of the pooled map. ``None``/``16`` is plain VGG conv5 (pool5 is
            never run: the "last stride 1" of ReID baselines); ``8`` dilates conv5 (dilation 2)
            so the map is twice as large, e.g. 32x16 instead of 16x8 for 256x128 input. Custom
            archs with fewer blocks: the last block's natural stride, or half of it.
        pooling, gem_p, embedding_dim, bnneck, normalize: see :class:`ReIDNet`.
        normalization: input normalisation (``"imagenet"``, ``"caffe"``, a dict or an
            :class:`~vggbackbone.weights.InputNormalization`); default: what the weights carry,
            ImageNet's for RGB. The model applies it to its ``[0, 1]`` RGB input
            (``model.normalization``).
        **backbone_kwargs: passed to :class:`~vggbackbone.VGGBackbone` (``width_mult``,
            ``frozen_stages``, ``norm_layer``, ``in_channels``...).
    """
    probe = VGGBackbone.available_taps(arch)
    last_conv = [t for t in probe if t.startswith("conv")][-1]
    n_blocks = int(last_conv[4:])
    natural = 2 ** (n_blocks - 1)  # stride of the last conv block with every pool before it strided
    output_stride = natural if output_stride is None else output_stride
    if output_stride not in (natural, natural // 2):
        raise ValueError(
            f"output_stride must be {natural} (plain {last_conv}) or {natural // 2} (dilated {last_conv}), "
            f"got {output_stride}"
        )
    bb_stride = 2**n_blocks if output_stride == natural else output_stride
    backbone, _ = build_trunk(
        arch, [last_conv], weights_backbone, output_stride=bb_stride, normalization=normalization, **backbone_kwargs
    )
    return ReIDNet(
        backbone,
        num_classes,
        pooling=pooling,
        gem_p=gem_p,
        embedding_dim=embedding_dim,
        bnneck=bnneck,
        normalize=normalize,
    )


class CenterLoss(nn.Module):
    """Center loss (Wen et al. 2016): ``mean_i ||f_i - c_{y_i}||^2 / 2``.

    pytorch-metric-learning has no center loss. The centres follow the paper's own update rule
    (``c_j -= alpha * sum_{y_i=j}(c_j - f_i) / (1 + n_j)``) instead of the main optimiser, whose
    Adam steps of ~lr would barely move them; under DDP the per-class sums are all-reduced so
    every process keeps the same centres.
    """

    def __init__(
        self, num_classes: int, dim: int, alpha: float = 0.5, init: Literal["zeros", "randn"] = "zeros"
    ) -> None:
        super().__init__()
        self.alpha = alpha
        if init not in ("zeros", "randn"):
            raise ValueError(f"center_init must be 'zeros' or 'randn', got {init!r}")
        # randn: reid-strong-baseline's layers/center_loss.py (nn.Parameter(torch.randn(classes, dim)))
        centers = torch.randn(num_classes, dim) if init == "randn" else torch.zeros(num_classes, dim)
        self.register_buffer("centers", centers)

    def forward(self, features: Tensor, labels: Tensor) -> Tensor:
        centers = self.centers[labels]
        loss = 0.5 * (features - centers).pow(2).sum(1).mean()
        if self.training:
            with torch.no_grad():
                diff = torch.zeros_like(self.centers).index_add_(0, labels, centers - features.detach().float())
                count = torch.zeros(len(self.centers), device=features.device).index_add_(
                    0, labels, torch.ones_like(labels, dtype=torch.float)
                )
                if dist.is_available() and dist.is_initialized():
                    dist.all_reduce(diff)
                    dist.all_reduce(count)
                self.centers -= self.alpha * diff / (1.0 + count[:, None])
        return loss
