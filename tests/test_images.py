"""``tasks/images.py``: the images a path names (folder, list file, single image) and their output names."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


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
