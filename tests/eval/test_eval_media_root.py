"""Eval media paths stay inside their data root: ``../``, absolute paths and symlinks out are refused with a
named MMInputError, as the training dataset refuses them (``mm_llama.data.dataset.inside_root``)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from mm_llama.errors import MMInputError
from mm_llama.eval import get_task
from tests.eval.eval_fixtures import (
    write_clotho_aqa,
    write_gqa_official,
    write_pope_official,
    write_toy_world,
)


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """An image outside every data root, with an absolute path."""
    path = tmp_path / "secret" / "outside.png"
    path.parent.mkdir()
    Image.new("RGB", (8, 8)).save(path)
    return path


def _toy_with_image(root: Path, image: str) -> Path:
    path = write_toy_world(root)
    records = json.loads(path.read_text())
    records[0]["image"] = image
    path.write_text(json.dumps(records))
    return path


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
@pytest.mark.parametrize("task_name", ["toy", "llava_qa"])
def test_record_media_outside_the_root_is_refused(
    tmp_path: Path, outside: Path, how: str, task_name: str
) -> None:
    root = tmp_path / "data"
    if how == "symlink":
        root.mkdir()
        (root / "link.png").symlink_to(outside)
        image = "link.png"
    else:
        image = "../secret/outside.png" if how == "dotdot" else str(outside)
    task = get_task(task_name, _toy_with_image(root, image))
    with pytest.raises(MMInputError, match=r"test-image-00000.*image path .*outside the data root"):
        list(task.load())


def test_record_media_inside_the_root_still_load(tmp_path: Path) -> None:
    task = get_task("toy", _toy_with_image(tmp_path / "data", "images/test/../test/00000.png"))
    assert [s.question_id for s in task.load()] == ["test-image-00000", "test-audio-00000"]


def test_pope_image_outside_the_root_is_refused(tmp_path: Path, outside: Path) -> None:
    root = write_pope_official(tmp_path / "pope")
    path = root / "coco_pope_random.json"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    lines[0]["image"] = str(outside)
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    with pytest.raises(MMInputError, match=r"POPE question .*image path .*outside the data root"):
        list(get_task("pope", root).load())


def test_gqa_image_id_outside_the_root_is_refused(tmp_path: Path) -> None:
    path = write_gqa_official(tmp_path / "gqa")
    doc = json.loads(path.read_text())
    first = next(iter(doc))
    doc[first]["imageId"] = "../../escape"
    path.write_text(json.dumps(doc))
    with pytest.raises(MMInputError, match=r"GQA question .*imageId path .*outside the data root"):
        list(get_task("gqa", path).load())


def test_clotho_file_name_outside_the_root_is_refused(tmp_path: Path) -> None:
    path = write_clotho_aqa(tmp_path / "clotho")
    with path.open() as fh:
        rows = list(csv.reader(fh))
    rows[1][0] = "../../outside.wav"
    with path.open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    with pytest.raises(MMInputError, match=r"Clotho-AQA question .*file_name path .*outside the data root"):
        list(get_task("clotho_aqa", path).load())
