"""Synthetic pedestrians in the Market-1501 folder layout, so ReID runs with no download.

Each identity is a drawn figure with its own clothing (top colour and pattern, sleeves, bottom
colour and cut, shoes, hair, bag, build). Each camera has its own scene (background colours and
texture), colour cast, brightness, blur and noise; each image its own viewpoint (front, back,
side), walking pose, detector-like crop jitter, mirror flip and sometimes an occluder. So an
identity looks different from camera to camera, and identities share attributes: a model must
learn combinations, and colour constancy, to match them.

Layout and names as Market-1501 (``PPPP_cCsS_FFFFFF_BB.jpg``)::

    bounding_box_train/  training identities (1..``max_per_camera`` images per camera)
    query/               one image per (test identity, camera)
    bounding_box_test/   the other images of the test identities, plus
                         ``0000_*`` distractors (background false alarms) and
                         ``-1_*`` junk (badly truncated crops of test identities), which the
                         benchmark protocol ignores

Deterministic from the seed and atomic (built in a temporary folder, renamed into place).
``python -m tasks.data market --out data/market_synth``; data modules call :func:`ensure_market`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from ._build import building, ensure_dataset

__all__ = ["MarketConfig", "ensure_market", "generate_market"]

SPEC_FILE = "market.json"

# distinct, nameable clothing colours (RGB)
_CLOTH = np.array(
    [
        (200, 30, 30),
        (30, 60, 190),
        (40, 150, 50),
        (230, 200, 40),
        (240, 240, 240),
        (25, 25, 25),
        (130, 130, 130),
        (240, 130, 20),
        (130, 40, 160),
        (120, 75, 30),
        (0, 170, 190),
        (240, 120, 170),
    ]
)
_SKIN = np.array([(240, 205, 180), (205, 160, 120), (150, 100, 70), (95, 60, 40)])
_HAIR = np.array([(20, 15, 10), (90, 55, 25), (200, 170, 90), (140, 140, 140), (150, 40, 20)])


@dataclass(frozen=True)
class MarketConfig:
    """Parameters of a generated dataset (stored in ``market.json`` beside the data).

    Args:
        num_train_ids: identities in ``bounding_box_train``.
        num_test_ids: identities in ``query`` / ``bounding_box_test``.
        num_cameras: cameras (Market-1501 has 6).
        min_cameras: fewest cameras that see an identity (at least 2, so queries have matches).
        max_cameras: most cameras that see an identity.
        max_per_camera: most images of an identity per camera (test identities get at least 2
            per camera: one query and at least one gallery image).
        num_distractors: ``0000`` background images in the gallery.
        num_junk: ``-1`` junk images in the gallery.
        height: image height in pixels (Market-1501: 128).
        width: image width in pixels (Market-1501: 64).
        seed: random seed; the same config always gives the same files.
    """

    num_train_ids: int = 120
    num_test_ids: int = 100
    num_cameras: int = 6
    min_cameras: int = 2
    max_cameras: int = 4
    max_per_camera: int = 3
    num_distractors: int = 40
    num_junk: int = 20
    height: int = 128
    width: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if not 2 <= self.min_cameras <= self.max_cameras <= self.num_cameras <= 9:
            raise ValueError("need 2 <= min_cameras <= max_cameras <= num_cameras <= 9")
        if self.num_train_ids < 1 or self.num_test_ids < 1 or self.num_train_ids + self.num_test_ids > 1500:
            raise ValueError("need 1 <= num_train_ids, num_test_ids and num_train_ids + num_test_ids <= 1500")
        if self.max_per_camera < 2 or self.height < 16 or self.width < 8:
            raise ValueError("need max_per_camera >= 2, height >= 16, width >= 8")


# A data module built in Python holds this dataclass in its hyper-parameters: allow it in
# torch.load(weights_only=True), which every checkpoint load of the tasks uses.
torch.serialization.add_safe_globals([MarketConfig])


@dataclass(frozen=True)
class _Identity:
    skin: tuple[int, int, int]
    hair: tuple[int, int, int]
    long_hair: bool
    top: tuple[int, int, int]
    top2: tuple[int, int, int]
    pattern: int  # 0 solid, 1 horizontal stripes, 2 two halves, 3 chest logo
    long_sleeves: bool
    bottom: tuple[int, int, int]
    cut: int  # 0 trousers, 1 shorts, 2 skirt
    shoes: tuple[int, int, int]
    bag: int  # 0 none, 1 backpack, 2 shoulder bag
    bag_colour: tuple[int, int, int]
    build: float
    stature: float


@dataclass(frozen=True)
class _Camera:
    wall: np.ndarray
    floor: np.ndarray
    horizon: float
    texture: int  # 0 plain, 1 vertical bars, 2 tiles
    gain: np.ndarray
    brightness: float
    blur: float
    noise: float


def _colour(rng: np.random.Generator, palette: np.ndarray) -> tuple[int, int, int]:
    return tuple(int(v) for v in palette[rng.integers(len(palette))])


def _make_identity(rng: np.random.Generator) -> _Identity:
    top = _colour(rng, _CLOTH)
    top2 = top
    while top2 == top:
        top2 = _colour(rng, _CLOTH)
    return _Identity(
        skin=_colour(rng, _SKIN),
        hair=_colour(rng, _HAIR),
        long_hair=bool(rng.random() < 0.35),
        top=top,
        top2=top2,
        pattern=int(rng.integers(4)),
        long_sleeves=bool(rng.random() < 0.5),
        bottom=_colour(rng, _CLOTH),
        cut=int(rng.choice(3, p=[0.6, 0.25, 0.15])),
        shoes=((25, 25, 25), (235, 235, 235), (120, 75, 30))[rng.integers(3)],
        bag=int(rng.choice(3, p=[0.5, 0.3, 0.2])),
        bag_colour=_colour(rng, _CLOTH),
        build=float(rng.uniform(0.85, 1.15)),
        stature=float(rng.uniform(0.9, 1.0)),
    )


def _make_camera(rng: np.random.Generator) -> _Camera:
    return _Camera(
        wall=rng.uniform(40, 220, 3),
        floor=rng.uniform(40, 200, 3),
        horizon=float(rng.uniform(0.45, 0.75)),
        texture=int(rng.integers(3)),
        gain=rng.uniform(0.8, 1.2, 3),
        brightness=float(rng.uniform(-25, 25)),
        blur=float(rng.uniform(0.0, 1.0)),
        noise=float(rng.uniform(2, 9)),
    )


def _background(rng: np.random.Generator, cam: _Camera, h: int, w: int) -> Image.Image:
    img = np.empty((h, w, 3), np.float32)
    y0 = int(h * (cam.horizon + rng.uniform(-0.08, 0.08)))
    img[:y0] = cam.wall + rng.normal(0, 10, 3)
    img[y0:] = cam.floor + rng.normal(0, 10, 3)
    if cam.texture == 1:
        period = int(rng.integers(6, 14)) * w // 64 + 2
        img[:y0, :: max(2, period)] *= 0.7
    elif cam.texture == 2:
        period = max(3, int(rng.integers(8, 16)) * h // 128)
        img[y0::period] *= 0.75
        img[y0:, ::period] *= 0.75
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


class _Figure(NamedTuple):
    """Where a person's parts go in a crop (pixels): centre, head radius, and the heights of the top
    of the head, the neck, the waist, the knees and the feet; ``half``: half the torso width."""

    cx: float
    top_y: float
    body_h: float
    half: float
    head_r: float
    neck_y: float
    waist_y: float
    knee_y: float
    feet_y: float


def _figure(ident: _Identity, rng: np.random.Generator, h: int, w: int, view: int) -> _Figure:
    cx = w / 2 + rng.uniform(-0.08, 0.08) * w
    top_y = h * (0.04 + (1 - ident.stature) * 0.5 + rng.uniform(-0.02, 0.03))
    body_h = h * 0.92 * ident.stature
    half = w * 0.2 * ident.build * (0.7 if view == 2 else 1.0)
    head_r = body_h * 0.07
    neck_y = top_y + 2 * head_r
    waist_y = neck_y + body_h * 0.36
    feet_y = top_y + body_h
    knee_y = waist_y + (feet_y - waist_y) * 0.5
    return _Figure(cx, top_y, body_h, half, head_r, neck_y, waist_y, knee_y, feet_y)


def _draw_legs(
    draw: ImageDraw.ImageDraw, ident: _Identity, f: _Figure, stride: float, rng: np.random.Generator
) -> None:
    """Legs in a walking pose (feet ``stride`` apart), the bottom (trousers, shorts or skirt) and shoes."""
    leg_w = f.half * 0.45
    for sgn in (-1, 1):
        hip_x = f.cx + sgn * f.half * 0.45
        foot_x = hip_x + sgn * stride * rng.uniform(0.5, 1.0)
        leg = [(hip_x - leg_w, f.waist_y), (hip_x + leg_w, f.waist_y), (foot_x + leg_w, f.feet_y),
               (foot_x - leg_w, f.feet_y)]  # fmt: skip
        draw.polygon(leg, fill=ident.skin)
        end_y = {0: f.feet_y - f.head_r * 0.6, 1: f.knee_y, 2: f.knee_y + f.head_r * 0.5}[ident.cut]
        t = (end_y - f.waist_y) / (f.feet_y - f.waist_y)
        cover = [
            leg[0],
            leg[1],
            (hip_x + leg_w + (foot_x - hip_x) * t, end_y),
            (hip_x - leg_w + (foot_x - hip_x) * t, end_y),
        ]
        draw.polygon(cover, fill=ident.bottom)
        shoe = [foot_x - leg_w * 1.2, f.feet_y - f.head_r * 0.6, foot_x + leg_w * 1.3, f.feet_y]
        draw.rectangle(shoe, fill=ident.shoes)
    if ident.cut == 2:  # skirt
        skirt = [(f.cx - f.half, f.waist_y), (f.cx + f.half, f.waist_y), (f.cx + f.half * 1.4, f.knee_y),
                 (f.cx - f.half * 1.4, f.knee_y)]  # fmt: skip
        draw.polygon(skirt, fill=ident.bottom)


def _draw_arms(draw: ImageDraw.ImageDraw, ident: _Identity, f: _Figure, swing: float, view: int) -> None:
    """Arms swung by ``swing``, sleeves long or short (one arm hidden sideways)."""
    arm_w = f.half * 0.32
    for sgn in (-1, 1):
        if view == 2 and sgn == -1:
            continue
        sx = f.cx + sgn * (f.half + arm_w * 0.6)
        hand = (sx + sgn * swing, f.waist_y + f.body_h * 0.08)
        shoulder = (sx, f.neck_y + f.head_r * 0.5)
        draw.line([shoulder, hand], fill=ident.skin, width=max(1, int(arm_w * 1.6)))
        sleeve_end = hand if ident.long_sleeves else ((sx + hand[0]) / 2, (f.neck_y + hand[1]) / 2)
        draw.line([shoulder, sleeve_end], fill=ident.top, width=max(1, int(arm_w * 1.8)))


def _draw_torso(draw: ImageDraw.ImageDraw, ident: _Identity, f: _Figure, view: int) -> None:
    """The torso with its pattern: plain, stripes, two halves or a logo (not seen from behind)."""
    cx, half, neck_y, waist_y = f.cx, f.half, f.neck_y, f.waist_y
    draw.rectangle([cx - half, neck_y, cx + half, waist_y], fill=ident.top)
    if ident.pattern == 1:
        step = max(2.0, (waist_y - neck_y) / 5)
        y = neck_y + step / 2
        while y < waist_y:
            draw.rectangle([cx - half, y, cx + half, min(waist_y, y + step / 2)], fill=ident.top2)
            y += step
    elif ident.pattern == 2:
        draw.rectangle([cx, neck_y, cx + half, waist_y], fill=ident.top2)
    elif ident.pattern == 3 and view != 1:
        s = half * 0.5
        my = (neck_y + waist_y) / 2
        draw.rectangle([cx - s, my - s, cx + s, my + s], fill=ident.top2)


def _draw_bag(draw: ImageDraw.ImageDraw, ident: _Identity, f: _Figure, view: int) -> None:
    """A backpack (whole from behind, a strip from the front or side) or a shoulder bag."""
    cx, half, head_r, neck_y, waist_y = f.cx, f.half, f.head_r, f.neck_y, f.waist_y
    if ident.bag == 1:
        if view == 1:
            box = [cx - half * 0.75, neck_y + head_r, cx + half * 0.75, waist_y - head_r * 0.3]
        else:
            sx = cx + (half if view == 2 else -half)
            box = [sx - half * 0.35, neck_y + head_r, sx + half * 0.15, waist_y - head_r * 0.5]
        draw.rectangle(box, fill=ident.bag_colour)
    elif ident.bag == 2:
        strap = [(cx - half, neck_y), (cx + half, waist_y - head_r)]
        draw.line(strap, fill=ident.bag_colour, width=max(1, int(half * 0.2)))
        bx = cx + half
        draw.rectangle([bx - half * 0.3, waist_y - head_r * 2, bx + half * 0.5, waist_y + head_r * 0.6],
                       fill=ident.bag_colour)  # fmt: skip


def _draw_head(draw: ImageDraw.ImageDraw, ident: _Identity, f: _Figure, view: int) -> None:
    """Head (the hair's colour from behind) and hair, long or short."""
    cx, head_r = f.cx, f.head_r
    hy = f.top_y + head_r
    head = [cx - head_r, hy - head_r, cx + head_r, hy + head_r]
    draw.ellipse(head, fill=ident.skin if view != 1 else ident.hair)
    draw.pieslice(head, 180, 360, fill=ident.hair)
    if ident.long_hair:
        draw.rectangle([cx - head_r, hy, cx + head_r * (0.3 if view == 2 else 1.0), hy + head_r * 2.2], fill=ident.hair)


def _draw_person(
    draw: ImageDraw.ImageDraw, ident: _Identity, rng: np.random.Generator, h: int, w: int, view: int
) -> None:
    """Draw ``ident`` facing the camera (view 0), away (1) or sideways (2), centred in (h, w)."""
    figure = _figure(ident, rng, h, w, view)
    stride = rng.uniform(0, 0.12) * w  # walking pose: feet apart
    _draw_legs(draw, ident, figure, stride, rng)
    _draw_arms(draw, ident, figure, rng.uniform(-0.06, 0.06) * w, view)
    _draw_torso(draw, ident, figure, view)
    _draw_bag(draw, ident, figure, view)
    _draw_head(draw, ident, figure, view)


def _render(
    rng: np.random.Generator, cfg: MarketConfig, cam: _Camera, ident: _Identity | None, junk: bool = False
) -> Image.Image:
    """One crop as a detector would give it: person (or background only), camera look, jitter."""
    h, w = cfg.height, cfg.width
    ss = 2  # draw at 2x and downsample: anti-aliased edges
    mh, mw = int(0.1 * h * ss), int(0.1 * w * ss)  # margin so jittered crops stay inside the scene
    canvas = _background(rng, cam, h * ss + 2 * mh, w * ss + 2 * mw)
    if ident is not None:
        layer = Image.new("RGBA", (w * ss, h * ss), (0, 0, 0, 0))
        view = int(rng.choice(3, p=[0.4, 0.35, 0.25]))
        _draw_person(ImageDraw.Draw(layer), ident, rng, h * ss, w * ss, view)
        if rng.random() < 0.5:
            layer = layer.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        canvas.paste(layer, (mw, mh), layer)
    if rng.random() < 0.15:  # an occluder (a passer-by, a pole)
        draw = ImageDraw.Draw(canvas)
        ow = rng.uniform(0.15, 0.35) * w * ss
        ox = mw + rng.choice([0.0, w * ss - ow])
        draw.rectangle(
            [ox, mh + rng.uniform(0.3, 0.7) * h * ss, ox + ow, mh + h * ss],
            fill=tuple(int(v) for v in rng.integers(0, 256, 3)),
        )
    # detector crop jitter (junk: a badly truncated box)
    if junk:
        frac = rng.uniform(0.3, 0.5)
        y0 = mh + rng.choice([0.0, (1 - frac) * h * ss])
        box = (mw, y0, mw + w * ss, y0 + frac * h * ss)
    else:
        s = rng.uniform(0.9, 1.05)
        bw, bh = w * ss * s, h * ss * s
        x0 = mw + (w * ss - bw) / 2 + rng.uniform(-0.06, 0.06) * w * ss
        y0 = mh + (h * ss - bh) / 2 + rng.uniform(-0.04, 0.04) * h * ss
        box = (x0, y0, x0 + bw, y0 + bh)
    img = canvas.resize((w, h), Image.Resampling.BILINEAR, box=box, reducing_gap=None)
    if cam.blur > 0.05:
        img = img.filter(ImageFilter.GaussianBlur(cam.blur))
    arr = np.asarray(img).astype(np.float32) * cam.gain * rng.uniform(0.9, 1.1) + cam.brightness
    arr += rng.normal(0, cam.noise, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def generate_market(root: str | Path, cfg: MarketConfig = MarketConfig(), *, progress: bool = True) -> Path:
    """Write the dataset described by ``cfg`` under ``root`` (replacing what is there)."""
    root = Path(root)
    rng = np.random.default_rng(cfg.seed)
    cameras = [_make_camera(rng) for _ in range(cfg.num_cameras)]
    pids = rng.permutation(np.arange(1, 1501))[: cfg.num_train_ids + cfg.num_test_ids]
    train_pids, test_pids = sorted(pids[: cfg.num_train_ids].tolist()), sorted(pids[cfg.num_train_ids :].tolist())
    frames = [0] * cfg.num_cameras

    # plan every image first: (folder, pid, camera, identity or None, junk)
    plan: list[tuple[str, int, int, _Identity | None, bool]] = []
    identities: dict[int, _Identity] = {}
    for split, split_pids in (("train", train_pids), ("test", test_pids)):
        for pid in split_pids:
            ident = identities[pid] = _make_identity(rng)
            n_cams = int(rng.integers(cfg.min_cameras, cfg.max_cameras + 1))
            for cam in sorted(rng.choice(cfg.num_cameras, n_cams, replace=False).tolist()):
                lo = 1 if split == "train" else 2
                n = int(rng.integers(lo, cfg.max_per_camera + 1))
                for j in range(n):
                    folder = "bounding_box_train" if split == "train" else ("query" if j == 0 else "bounding_box_test")
                    plan.append((folder, pid, cam, ident, False))
    for _ in range(cfg.num_distractors):
        plan.append(("bounding_box_test", 0, int(rng.integers(cfg.num_cameras)), None, False))
    for _ in range(cfg.num_junk):
        pid = int(test_pids[rng.integers(len(test_pids))])
        plan.append(("bounding_box_test", -1, int(rng.integers(cfg.num_cameras)), identities[pid], True))

    iterator = plan
    try:
        from tqdm import tqdm

        iterator = tqdm(plan, desc=f"generating market in {root}", disable=not progress, leave=False)
    except ImportError:  # pragma: no cover
        pass
    with building(root) as tmp:
        for folder in ("bounding_box_train", "query", "bounding_box_test"):
            (tmp / folder).mkdir()
        for folder, pid, cam, ident, junk in iterator:
            frames[cam] += int(rng.integers(1, 40))
            seq = 1 + frames[cam] // 5000
            name = f"{pid:04d}_c{cam + 1}s{seq}_{frames[cam]:06d}_{int(rng.integers(1, 9)):02d}.jpg"
            if pid == -1:
                name = "-1" + name[4:]
            _render(rng, cfg, cameras[cam], ident, junk).save(tmp / folder / name, quality=92)
        spec = asdict(cfg) | {"train_pids": train_pids, "test_pids": test_pids}
        (tmp / SPEC_FILE).write_text(json.dumps(spec, indent=2))
    return root


def ensure_market(root: str | Path, cfg: MarketConfig = MarketConfig(), *, progress: bool = True) -> Path:
    """Generate the dataset unless ``root`` already holds one made with the same ``cfg``."""
    return ensure_dataset(root, cfg, SPEC_FILE, generate_market, progress=progress, option="data.synthetic")
