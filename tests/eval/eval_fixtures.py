"""Benchmark files in the exact official / lmms-lab layouts, written into a test's tmp_path.

Each writer returns the ``data`` path the task takes. Images are tiny PNGs (parquet: embedded bytes) or
JPEGs on disk; the answers are chosen so the expected scores are easy to work out by hand.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import soundfile as sf
from PIL import Image

VQA_QUESTIONS = [
    (1, 42, "What color is the cat?", ["black"] * 9 + ["dark"], "other"),
    (2, 42, "Is it sleeping?", ["yes"] * 10, "yes/no"),
    (3, 43, "How many dogs?", ["two"] * 5 + ["2"] * 4 + ["3"], "number"),
    (4, 43, "What is on the sign?", ["1,000"] * 2 + ["1000"] + ["stop"] * 7, "other"),
    (5, 44, "Where is the dog?", ["a park"] * 2 + ["park"] * 2 + ["grass"] * 6, "other"),
]


def png_bytes(color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (8, 6)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def write_parquet(path: Path, columns: dict[str, list[Any]], features: datasets.Features) -> Path:
    """One parquet file written by ``datasets`` (as the lmms-lab repos are), image columns embedded."""
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(columns, features=features).to_parquet(str(path))
    return path


def write_vqav2_official(root: Path, with_annotations: bool = True) -> Path:
    """``v2_OpenEnded_mscoco_val2014_questions.json`` + annotations + ``val2014/COCO_val2014_*.jpg``."""
    root.mkdir(parents=True, exist_ok=True)
    questions = {
        "info": {},
        "task_type": "Open-Ended",
        "data_type": "mscoco",
        "license": {},
        "data_subtype": "val2014",
        "questions": [
            {"image_id": img, "question": q, "question_id": qid} for qid, img, q, _, _ in VQA_QUESTIONS
        ],
    }
    annotations = {
        "info": {},
        "license": {},
        "data_subtype": "val2014",
        "annotations": [
            {
                "question_type": "what",
                "multiple_choice_answer": answers[0],
                "answers": [
                    {"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                    for i, a in enumerate(answers)
                ],
                "image_id": img,
                "answer_type": answer_type,
                "question_id": qid,
            }
            for qid, img, _, answers, answer_type in VQA_QUESTIONS
        ],
    }
    (root / "val2014").mkdir(exist_ok=True)
    for image_id in {img for _, img, _, _, _ in VQA_QUESTIONS}:
        Image.new("RGB", (8, 8), (image_id, 0, 0)).save(
            root / "val2014" / f"COCO_val2014_{image_id:012d}.jpg"
        )
    path = root / "v2_OpenEnded_mscoco_val2014_questions.json"
    path.write_text(json.dumps(questions))
    if with_annotations:
        (root / "v2_mscoco_val2014_annotations.json").write_text(json.dumps(annotations))
    return path


def write_vqav2_parquet(root: Path) -> Path:
    """lmms-lab/VQAv2 layout: ``data/validation-00000-of-00001.parquet``."""
    features = datasets.Features(
        {
            "question_type": datasets.Value("string"),
            "multiple_choice_answer": datasets.Value("string"),
            "answers": [
                {
                    "answer": datasets.Value("string"),
                    "answer_confidence": datasets.Value("string"),
                    "answer_id": datasets.Value("int64"),
                }
            ],
            "image_id": datasets.Value("int64"),
            "answer_type": datasets.Value("string"),
            "question_id": datasets.Value("int64"),
            "question": datasets.Value("string"),
            "image": datasets.Image(),
        }
    )
    columns: dict[str, list[Any]] = {name: [] for name in features}
    for qid, img, question, answers, answer_type in VQA_QUESTIONS:
        columns["question_type"].append("what")
        columns["multiple_choice_answer"].append(answers[0])
        columns["answers"].append(
            [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)]
        )
        columns["image_id"].append(img)
        columns["answer_type"].append(answer_type)
        columns["question_id"].append(qid)
        columns["question"].append(question)
        columns["image"].append({"bytes": png_bytes((img, 0, 0)), "path": None})
    write_parquet(root / "data" / "validation-00000-of-00001.parquet", columns, features)
    return root


def write_gqa_official(root: Path) -> Path:
    """``testdev_balanced_questions.json`` (``{id: {...}}``) + ``images/{imageId}.jpg``."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    questions = {
        "201307251": {
            "imageId": "n161313",
            "question": "Is it overcast?",
            "answer": "no",
            "fullAnswer": "No.",
        },
        "201640614": {"imageId": "n235859", "question": "Who is wearing a shirt?", "answer": "girl"},
    }
    for q in questions.values():
        Image.new("RGB", (8, 8)).save(root / "images" / f"{q['imageId']}.jpg")
    path = root / "testdev_balanced_questions.json"
    path.write_text(json.dumps(questions))
    return path


def write_gqa_parquet(root: Path) -> Path:
    """lmms-lab/GQA layout: instructions and images as two parquet configs, joined on imageId."""
    write_parquet(
        root / "testdev_balanced_instructions" / "testdev-00000-of-00001.parquet",
        {
            "id": ["201307251", "201640614"],
            "imageId": ["n161313", "n235859"],
            "question": ["Is it overcast?", "Who is wearing a shirt?"],
            "answer": ["no", "girl"],
            "fullAnswer": ["No, it is clear.", "The girl is wearing a shirt."],
        },
        datasets.Features(
            {k: datasets.Value("string") for k in ("id", "imageId", "question", "answer", "fullAnswer")}
        ),
    )
    write_parquet(
        root / "testdev_balanced_images" / "testdev-00000-of-00001.parquet",
        {"id": ["n235859", "n161313"], "image": [{"bytes": png_bytes((0, 9, 0)), "path": None}] * 2},
        datasets.Features({"id": datasets.Value("string"), "image": datasets.Image()}),
    )
    return root


def write_pope_official(root: Path) -> Path:
    """``coco_pope_{random,adversarial}.json`` (JSON lines) next to the COCO images."""
    root.mkdir(parents=True, exist_ok=True)
    rows = {
        "random": [(1, "yes"), (2, "no"), (3, "yes")],
        "adversarial": [(1, "no"), (2, "yes")],
    }
    image = "COCO_val2014_000000310196.jpg"
    Image.new("RGB", (8, 8)).save(root / image)
    for category, items in rows.items():
        lines = [
            json.dumps(
                {"question_id": qid, "image": image, "text": f"Is there a thing {qid}?", "label": label}
            )
            for qid, label in items
        ]
        (root / f"coco_pope_{category}.json").write_text("\n".join(lines) + "\n")
    return root


def write_textvqa_parquet(root: Path) -> Path:
    features = datasets.Features(
        {
            "question_id": datasets.Value("int64"),
            "question": datasets.Value("string"),
            "image": datasets.Image(),
            "answers": datasets.Sequence(datasets.Value("string")),
        }
    )
    columns = {
        "question_id": [34602, 34603],
        "question": ["what is the brand?", "what does the sign say?"],
        "image": [{"bytes": png_bytes(), "path": None}] * 2,
        "answers": [["Coca Cola"] * 2 + ["coca-cola"] * 2 + ["pepsi"] * 6, ["stop"] * 10],
    }
    return write_parquet(root / "validation-00000-of-00001.parquet", columns, features)


def write_vizwiz_parquet(root: Path) -> Path:
    features = datasets.Features(
        {
            "question_id": datasets.Value("string"),
            "question": datasets.Value("string"),
            "image": datasets.Image(),
            "answers": datasets.Sequence(datasets.Value("string")),
            "category": datasets.Value("string"),
        }
    )
    columns = {
        "question_id": ["VizWiz_val_00000000", "VizWiz_val_00000001"],
        "question": ["What is this?", "What color is it?"],
        "image": [{"bytes": png_bytes(), "path": None}] * 2,
        "answers": [["unanswerable"] * 10, ["blue"] * 3 + ["navy"] * 7],
        "category": ["unanswerable", "other"],
    }
    return write_parquet(root / "val-00000-of-00001.parquet", columns, features)


def write_scienceqa_parquet(root: Path) -> Path:
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "choices": datasets.Sequence(datasets.Value("string")),
            "answer": datasets.Value("int8"),
            "hint": datasets.Value("string"),
            "subject": datasets.Value("string"),
        }
    )
    columns = {
        "image": [{"bytes": png_bytes(), "path": None}, None],
        "question": ["Which is a mammal?", "Which is heavier?"],
        "choices": [["frog", "whale", "trout"], ["feather", "brick"]],
        "answer": [1, 1],
        "hint": ["Look at the picture.", ""],
        "subject": ["natural science", "natural science"],
    }
    return write_parquet(root / "ScienceQA-IMG" / "test-00000-of-00001.parquet", columns, features)


def write_pope_parquet(root: Path) -> Path:
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "question_id": datasets.Value("string"),
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "image_source": datasets.Value("string"),
            "image": datasets.Image(),
            "category": datasets.Value("string"),
        }
    )
    columns = {
        "id": ["0", "1", "2"],
        "question_id": ["1", "2", "1"],
        "question": ["Is there a snowboard in the image?", "Is there a dog?", "Is there a cat?"],
        "answer": ["yes", "no", "no"],
        "image_source": ["COCO_val2014_000000310196"] * 3,
        "image": [{"bytes": png_bytes(), "path": None}] * 3,
        "category": ["adversarial", "adversarial", "popular"],
    }
    return write_parquet(root / "test-00000-of-00001.parquet", columns, features)


def write_mme_parquet(root: Path) -> Path:
    features = datasets.Features(
        {
            "question_id": datasets.Value("string"),
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "category": datasets.Value("string"),
        }
    )
    columns = {
        "question_id": ["code_reasoning/0020.png", "code_reasoning/0020.png", "OCR/0001.jpg", "OCR/0001.jpg"],
        "image": [{"bytes": png_bytes(), "path": None}] * 4,
        "question": [
            "Is the output 3? Please answer yes or no.",
            "Is the output 4? Please answer yes or no.",
            "Is the word STOP? Please answer yes or no.",
            "Is the word GO? Please answer yes or no.",
        ],
        "answer": ["Yes", "No", "Yes", "No"],
        "category": ["code_reasoning", "code_reasoning", "OCR", "OCR"],
    }
    return write_parquet(root / "test-00000-of-00001.parquet", columns, features)


def write_mmbench_parquet(root: Path) -> Path:
    string = datasets.Value("string")
    features = datasets.Features(
        {
            "index": datasets.Value("int64"),
            "question": string,
            "hint": string,
            "A": string,
            "B": string,
            "C": string,
            "D": string,
            "answer": string,
            "category": string,
            "image": datasets.Image(),
            "source": string,
            "L2-category": string,
            "comment": string,
            "split": string,
        }
    )
    columns = {
        "index": [241, 242],
        "question": ["Which animal is shown?", "What is the weather?"],
        "hint": ["nan", "Look at the sky."],
        "A": ["cat", "sunny"],
        "B": ["dog", "rainy"],
        "C": ["bird", "nan"],
        "D": ["nan", "nan"],
        "answer": ["B", "A"],
        "category": ["image_scene", "image_scene"],
        "image": [{"bytes": png_bytes(), "path": None}] * 2,
        "source": ["MMBench"] * 2,
        "L2-category": ["coarse_perception"] * 2,
        "comment": ["nan"] * 2,
        "split": ["dev"] * 2,
    }
    return write_parquet(root / "en" / "dev-00000-of-00001.parquet", columns, features)


def write_clotho_aqa(root: Path) -> Path:
    """``clotho_aqa_test.csv`` (one row per rater) and ``audio_files/*.wav``."""
    (root / "audio_files").mkdir(parents=True, exist_ok=True)
    sf.write(root / "audio_files" / "birds.wav", np.zeros(1600, dtype=np.float32), 16000)
    rows = [
        ("birds.wav", "Are birds singing?", "yes", "yes"),
        ("birds.wav", "Are birds singing?", "yes", "maybe"),
        ("birds.wav", "Are birds singing?", "no", "yes"),
        ("birds.wav", "What animal is heard?", "bird", "yes"),
        ("birds.wav", "What animal is heard?", "birds", "yes"),
        ("birds.wav", "What animal is heard?", "bird", "yes"),
    ]
    path = root / "clotho_aqa_test.csv"
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file_name", "QuestionText", "answer", "confidence"])
        writer.writerows(rows)
    return path


def write_toy_world(root: Path) -> Path:
    """A toy-world ``instruct_test.json``: image and audio questions, media paths relative to the JSON."""
    (root / "images" / "test").mkdir(parents=True, exist_ok=True)
    (root / "audio" / "test").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (220, 40, 40)).save(root / "images" / "test" / "00000.png")
    sf.write(root / "audio" / "test" / "00000.wav", np.zeros(1600, dtype=np.float32), 16000)
    records = [
        {
            "id": "test-image-00000",
            "image": "images/test/00000.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat colour is the circle?"},
                {"from": "gpt", "value": "red"},
            ],
            "question_type": "image_color",
            "answer": "red",
            "choices": ["red", "green", "blue", "yellow"],
        },
        {
            "id": "test-audio-00000",
            "audio": "audio/test/00000.wav",
            "conversations": [
                {"from": "human", "value": "<audio>\nHow many beeps?"},
                {"from": "gpt", "value": "two"},
            ],
            "question_type": "audio_count",
            "answer": "two",
            "choices": ["one", "two", "three", "four"],
        },
    ]
    path = root / "instruct_test.json"
    path.write_text(json.dumps(records))
    return path


def write_depth_qa(root: Path, answers: dict[str, str] | None = None) -> Path:
    """A LLaVA-format ``qa.json`` of a plugin modality: two depth maps (``maps/*.npy``), three questions
    (one with both maps, in a list), and one image question; references from ``answers`` by id."""
    answers = {"d0": "Near.", "d1": "two boxes", "d01": "The left one.", "i0": "red", **(answers or {})}
    (root / "maps").mkdir(parents=True, exist_ok=True)
    for i in range(2):
        np.save(root / "maps" / f"{i}.npy", np.full((6, 8), 1.0 + i, dtype=np.float32))
    Image.new("RGB", (8, 8), (220, 40, 40)).save(root / "red.png")

    def record(qid: str, key: str, media: str | list[str], question: str) -> dict[str, Any]:
        turns = [{"from": "human", "value": question}, {"from": "gpt", "value": answers[qid]}]
        return {"id": qid, key: media, "conversations": turns}

    records = [
        record("d0", "depth", "maps/0.npy", "<depth>\nIs it near or far?"),
        record("d1", "depth", "maps/1.npy", "How many boxes are in <depth>?"),
        record("d01", "depth", ["maps/0.npy", "maps/1.npy"], "<depth> <depth>\nWhich is closer?"),
        record("i0", "image", "red.png", "<image>\nWhat colour is it?"),
    ]
    path = root / "qa.json"
    path.write_text(json.dumps(records))
    return path
