"""Draft-mode JPEG decoding (``read_image(path, draft=(h, w))``): which scale, never below the
target, exact where it does not apply, close to the full decode after the resize where it does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from tasks.images import draft_decode, read_image


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth picture with some edges (what JPEG is for), uint8 (h, w, 3)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([np.sin(6 * xx + c) * np.cos(4 * yy - c) for c in range(3)], -1) * 90 + 128
    img[h // 3 : h // 2, w // 4 : w // 2] = rng.integers(0, 255, 3)  # a flat patch with sharp edges
    return img.clip(0, 255).astype(np.uint8)


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return v2.Resize(size, antialias=True)(x).float()


@pytest.mark.parametrize(
    ("stored", "target", "scale"),
    [
        ((512, 256), (64, 32), 8),
        ((512, 256), (128, 64), 4),
        ((256, 128), (128, 64), 2),
        ((256, 128), (130, 64), 1),
        ((255, 129), (64, 32), 2),
    ],
)
def test_draft_picks_the_largest_reduction_that_stays_at_least_the_target(
    tmp_path: Path, stored: tuple[int, int], target: tuple[int, int], scale: int
) -> None:
    path = tmp_path / "a.jpg"
    Image.fromarray(_photo(*stored)).save(path, quality=92)
    with Image.open(path) as img:
        assert draft_decode(img, "RGB", target) == scale
    x = read_image(path, draft=target)
    assert tuple(x.shape[1:]) == (-(-stored[0] // scale), -(-stored[1] // scale))  # ceil, as libjpeg
    assert x.shape[1] >= target[0] and x.shape[2] >= target[1]


def test_draft_is_close_to_the_full_decode_after_the_resize(tmp_path: Path) -> None:
    path = tmp_path / "a.jpg"
    Image.fromarray(_photo(512, 256)).save(path, quality=92)
    for target in [(64, 32), (128, 64), (200, 100)]:
        full, fast = _resize(read_image(path), target), _resize(read_image(path, draft=target), target)
        diff = (full - fast).abs()
        # grey levels of 255: the DCT-domain downscale vs an antialiased bilinear one
        assert diff.mean() < 2.0 and diff.max() < 40, (target, diff.mean(), diff.max())


def test_draft_changes_nothing_where_it_does_not_apply(tmp_path: Path) -> None:
    arr = _photo(128, 64)
    Image.fromarray(arr).save(tmp_path / "a.png")
    Image.fromarray(arr).save(tmp_path / "a.jpg", quality=92)
    Image.fromarray(arr[:, :, 0]).save(tmp_path / "g.jpg", quality=92)
    assert torch.equal(read_image(tmp_path / "a.png", draft=(32, 16)), read_image(tmp_path / "a.png"))  # not a JPEG
    assert torch.equal(read_image(tmp_path / "a.jpg", draft=(100, 50)), read_image(tmp_path / "a.jpg"))  # < 2x
    gray = read_image(tmp_path / "g.jpg", draft=(64, 32))  # a greyscale JPEG, asked for RGB
    assert gray.shape == (3, 64, 32) and torch.equal(gray[0], gray[1])


def test_draft_follows_the_exif_rotation(tmp_path: Path) -> None:
    # stored 256 wide x 128 high, EXIF says rotate by 90 degrees: displayed 128 x 256 (h x w) ...
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "r.jpg"
    Image.fromarray(_photo(128, 256)).save(path, quality=92, exif=exif)
    with Image.open(path) as img:
        # ... so a (64, 32) target (displayed h x w) is 32 x 64 stored: 1/4, not 1/2 of the other reading
        assert draft_decode(img, "RGB", (256 // 4, 128 // 4)) == 4
        assert img.size == (64, 32)


def test_extract_draft_decode_embeds_the_draft_pixels_and_is_off_by_default(tmp_path: Path) -> None:
    from tasks.reid_extract import extract_embeddings, load_embeddings
    from vggbackbone.models import reid_vgg

    files = []
    for i in range(3):
        files.append(tmp_path / f"{i}.jpg")
        Image.fromarray(_photo(128, 64, seed=i)).save(files[-1], quality=92)
    torch.manual_seed(0)
    net = reid_vgg("vgg11", width_mult=0.125, embedding_dim=8).eval()
    tf = v2.Compose([v2.Resize((32, 16), antialias=True), v2.ToDtype(torch.float32, scale=True)])

    def direct(draft: tuple[int, int] | None) -> np.ndarray:
        with torch.no_grad():
            return net(torch.stack([tf(read_image(f, draft=draft)) for f in files])).numpy()

    kw = {"image_size": (32, 16), "batch_size": 2, "num_workers": 0, "precision": "fp32"}
    kw["trainer"] = {"accelerator": "cpu", "enable_progress_bar": False}
    full = load_embeddings(extract_embeddings(net, files, tmp_path / "full.npz", **kw))["embeddings"]
    fast = load_embeddings(extract_embeddings(net, files, tmp_path / "fast.npz", draft_decode=True, **kw))
    np.testing.assert_allclose(full, direct(None), atol=1e-5)
    np.testing.assert_allclose(fast["embeddings"], direct((32, 16)), atol=1e-5)
    assert np.abs(fast["embeddings"] - full).max() > 1e-4  # other pixels (1/4-scale decode), other embeddings
