"""Toy world: a seeded, procedurally generated multimodal dataset for training any-to-text models on a CPU.

Four modalities, each sample drawn independently from its own seed:

- image (PNG, ``image_size`` px square): 1-3 non-overlapping shapes (circle, square, triangle) in the cells
  of a 2x2 grid, each with a colour (red, green, blue, yellow) and a size (small, large).
- audio (WAV, 16 kHz mono, 1 s): 1-4 beeps separated by silence, low (~300 Hz) or high (~1500 Hz),
  sine or (band-limited) square, with a little noise.
- video (MP4, H.264 ``libx264`` or ``mpeg4``, yuv420p, 8 frames at 8 fps): one shape moving left, right,
  up or down across the frame.
- imu (CSV ``timestamp,acc_x,acc_y,acc_z,gyro_x,gyro_y,gyro_z``, 100 Hz, 2.56 s; m/s^2 including
  gravity on +z, rad/s): a person standing, walking, running or jumping, with jittered step rate,
  amplitude, phase, a small sensor tilt and sensor noise.

Written under ``out_dir`` in the LLaVA conversation format (media paths relative to ``out_dir``)::

    world.json                    seed, settings, counts per split / question type / answer, chance levels
    align_{split}.json            stage 1: human "<image>", gpt caption ("a large red circle in the top left")
    instruct_{split}.json         stage 2: human "<image>\\nWhat colour is the circle?", gpt "red", plus
                                  "question_type", "answer" and "choices" (chance = 1 / len(choices))
    attributes_{split}.json       ground truth per sample id (shape centres, beep onsets, ...)
    images/{split}/00000.png  audio/{split}/00000.wav  video/{split}/00000.mp4  imu/{split}/00000.csv

Each media sample has one caption record and one question record. Question types and their answers are
assigned first (balanced within +-1 per split) and the media are drawn to match, so every answer is
equally likely and chance level is ``1 / len(choices)``. With ``multi_turn`` (the default), a training
record goes on, LLaVA-style, with follow-up turns asking the modality's other question types about the
same media (answers read from its attributes, listed under ``"turns"``): more supervised answers per
media token and per step. Validation and test records always ask one question, the unit of evaluation.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import multiprocessing
import os
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np
import soundfile as sf
from PIL import Image, ImageDraw

from mm_llama.cli_args import add_toyworld_args  # defined there: `mm-llama --help` loads no media libraries
from mm_llama.errors import MMInputError

MODALITIES: tuple[str, ...] = ("image", "audio", "video", "imu")
SPLITS: tuple[str, ...] = ("train", "val", "test")
MEDIA_DIRS: dict[str, str] = {"image": "images", "audio": "audio", "video": "video", "imu": "imu"}
MEDIA_EXTENSIONS: dict[str, str] = {"image": "png", "audio": "wav", "video": "mp4", "imu": "csv"}
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four")

# Image and video drawing.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 195, 20),
}
BACKGROUND_RGB: tuple[int, int, int] = (245, 245, 240)
CELLS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")  # 2x2 grid, row-major
SIZES: dict[str, float] = {"small": 0.24, "large": 0.37}  # shape radius as a fraction of a grid cell
SIZE_JITTER = 0.08  # relative radius jitter
CELL_MARGIN = 0.05  # min gap between a shape and its cell border, fraction of a cell
MAX_SHAPES = 3
SUPERSAMPLE = 4  # draw at 4x and downsample, for anti-aliased edges
SQUARE_HALF_SIDE = 0.85  # half side / radius, so a square's area is close to the circle's
TRIANGLE_HALF_SIDE = 1.1  # half side / radius of an upward equilateral triangle (its widest reach)

# Audio.
AUDIO_SAMPLE_RATE = 16_000
AUDIO_DURATION_S = 1.0
PITCHES_HZ: dict[str, float] = {"low": 300.0, "high": 1500.0}
PITCH_JITTER = 0.08  # relative frequency jitter
WAVEFORMS: tuple[str, ...] = ("sine", "square")
MAX_BEEPS = 4
BEEP_DURATION_S: tuple[float, float] = (0.08, 0.14)
BEEP_GAP_S = 0.08  # min silence between beeps
AUDIO_EDGE_S = 0.03  # min silence at both ends
FADE_S = 0.005  # raised-cosine ramp at each beep end, against clicks
BEEP_AMPLITUDE: tuple[float, float] = (0.3, 0.6)
AUDIO_NOISE_STD: tuple[float, float] = (0.002, 0.01)

# Video.
VIDEO_FRAMES = 8
VIDEO_FPS = 8
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
VIDEO_SHAPE_RADIUS = 0.14  # fraction of the frame side
VIDEO_TRAVEL: tuple[float, float] = (0.22, 0.78)  # start and end of the centre along the motion axis
VIDEO_CODECS: tuple[str, ...] = ("libx264", "mpeg4")  # first one this PyAV build can encode
VIDEO_CODEC_OPTIONS: dict[str, dict[str, str]] = {
    "libx264": {"preset": "ultrafast", "crf": "16", "threads": "1"},
    "mpeg4": {"qscale": "2", "threads": "1"},
}

# IMU.
IMU_RATE_HZ = 100
IMU_SAMPLES = 256  # 2.56 s
IMU_COLUMNS: tuple[str, ...] = ("timestamp", "acc_x", "acc_y", "acc_z", "gyro_x", "gyro_y", "gyro_z")
GRAVITY = 9.81  # m/s^2
ACTIVITIES: tuple[str, ...] = ("standing", "walking", "running", "jumping")
MAX_TILT_RAD = math.radians(12)  # random sensor mounting tilt
ACC_NOISE_STD: tuple[float, float] = (0.03, 0.08)  # m/s^2
GYRO_NOISE_STD: tuple[float, float] = (0.005, 0.02)  # rad/s

DEFAULT_N_TRAIN = 1000
DEFAULT_N_VAL = 100
DEFAULT_N_TEST = 200


@dataclass(frozen=True)
class QuestionType:
    """A stage-2 question: its modality, the answers it can have and paraphrased templates."""

    modality: str
    choices: tuple[str, ...]
    templates: tuple[str, ...]  # may use {shape}


QUESTION_TYPES: dict[str, QuestionType] = {
    "shape_color": QuestionType(
        "image",
        tuple(COLORS),
        (
            "What colour is the {shape}?",
            "What color is the {shape}?",
            "Which colour is the {shape} in the image?",
            "Tell me the colour of the {shape}.",
        ),
    ),
    "count_shapes": QuestionType(
        "image",
        ("1", "2", "3"),
        (
            "How many shapes are there?",
            "How many shapes are in the image?",
            "Count the shapes in the picture.",
            "What is the number of shapes?",
        ),
    ),
    "shape_exists": QuestionType(
        "image",
        ("yes", "no"),
        (
            "Is there a {shape}?",
            "Is there a {shape} in the image?",
            "Does the picture contain a {shape}?",
            "Can you see a {shape}?",
        ),
    ),
    "count_beeps": QuestionType(
        "audio",
        ("1", "2", "3", "4"),
        (
            "How many beeps are there?",
            "How many beeps do you hear?",
            "Count the beeps.",
            "What is the number of beeps in the sound?",
        ),
    ),
    "pitch": QuestionType(
        "audio",
        ("high", "low"),
        (
            "Are the beeps high or low?",
            "Is the pitch high or low?",
            "Is this a high or a low sound?",
            "What is the pitch of the beeps?",
        ),
    ),
    "motion_direction": QuestionType(
        "video",
        DIRECTIONS,
        (
            "Which direction is the shape moving?",
            "Where is the shape going?",
            "In which direction does the shape move?",
            "Is the shape moving left, right, up or down?",
        ),
    ),
    "activity": QuestionType(
        "imu",
        ACTIVITIES,
        (
            "What is the person doing?",
            "Which activity is this?",
            "What activity does this motion show?",
            "What is the wearer doing?",
        ),
    ),
}

Attrs = dict[str, Any]  # JSON-serialisable ground truth of one sample


# ----------------------------------------------------------------------------------------------- image


def _sample_shape(rng: np.random.Generator, shape: str, color: str, cell: int, image_size: int) -> Attrs:
    """One shape in a 2x2 grid cell, with jittered radius and centre kept inside the cell."""
    cell_px = image_size / 2
    size = str(rng.choice(list(SIZES)))
    radius = SIZES[size] * cell_px * (1 + rng.uniform(-SIZE_JITTER, SIZE_JITTER))
    extent = radius * TRIANGLE_HALF_SIDE  # the largest reach of any shape from its centre
    slack = cell_px / 2 - extent - CELL_MARGIN * cell_px  # > 0 for every size in SIZES
    row, col = divmod(cell, 2)
    cx = (col + 0.5) * cell_px + rng.uniform(-slack, slack)
    cy = (row + 0.5) * cell_px + rng.uniform(-slack, slack)
    return {
        "shape": shape,
        "color": color,
        "size": size,
        "position": CELLS[cell],
        "center": [round(cx, 2), round(cy, 2)],
        "radius": round(radius, 2),
    }


def _sample_image(rng: np.random.Generator, qtype: str, answer: str, image_size: int) -> tuple[Attrs, Attrs]:
    """Shapes for an image whose answer to ``qtype`` is ``answer``; returns (attributes, template slots)."""
    n = int(answer) if qtype == "count_shapes" else int(rng.integers(1, MAX_SHAPES + 1))
    subject = str(rng.choice(SHAPES))
    others = [s for s in SHAPES if s != subject]
    if qtype == "shape_color":  # the named shape appears exactly once, in the answer's colour
        kinds = [subject] + [str(rng.choice(others)) for _ in range(n - 1)]
    elif qtype == "count_shapes":
        kinds = [str(rng.choice(SHAPES)) for _ in range(n)]
    elif qtype == "shape_exists":
        pool = SHAPES if answer == "yes" else others
        kinds = [str(rng.choice(pool)) for _ in range(n)]
        if answer == "yes":
            kinds[0] = subject
    else:
        raise ValueError(f"unknown image question type {qtype!r}")
    colors = [str(rng.choice(list(COLORS))) for _ in kinds]
    if qtype == "shape_color":
        colors[0] = answer
    cells = rng.permutation(len(CELLS))[: len(kinds)]
    shapes = [_sample_shape(rng, k, c, int(cell), image_size) for k, c, cell in zip(kinds, colors, cells)]
    shapes.sort(key=lambda s: CELLS.index(s["position"]))
    return {"shapes": shapes}, {"shape": subject}


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, rgb: tuple) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=rgb)
    elif shape == "square":
        h = r * SQUARE_HALF_SIDE
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=rgb)
    elif shape == "triangle":
        w = r * TRIANGLE_HALF_SIDE
        h = w * math.sqrt(3) / 2  # half height; the bounding box is centred on (cx, cy)
        draw.polygon([(cx, cy - h), (cx + w, cy + h), (cx - w, cy + h)], fill=rgb)
    else:
        raise ValueError(f"unknown shape {shape!r}; choices: {', '.join(SHAPES)}")


def render_shapes(shapes: Sequence[Attrs], size: int) -> np.ndarray:
    """Draw shapes (dicts with shape, color, center, radius in pixels) on the background -> (size, size, 3) uint8."""
    big = Image.new("RGB", (size * SUPERSAMPLE, size * SUPERSAMPLE), BACKGROUND_RGB)
    draw = ImageDraw.Draw(big)
    for s in shapes:
        cx, cy = s["center"]
        _draw_shape(
            draw,
            s["shape"],
            cx * SUPERSAMPLE,
            cy * SUPERSAMPLE,
            s["radius"] * SUPERSAMPLE,
            COLORS[s["color"]],
        )
    return np.asarray(big.resize((size, size), Image.Resampling.BOX))


def _write_image(attrs: Attrs, path: Path, rng: np.random.Generator, size: int) -> None:
    Image.fromarray(render_shapes(attrs["shapes"], size)).save(path, compress_level=1)


def _image_caption(attrs: Attrs) -> str:
    parts = [f"a {s['size']} {s['color']} {s['shape']} in the {s['position']}" for s in attrs["shapes"]]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


# ----------------------------------------------------------------------------------------------- audio


def _sample_audio(rng: np.random.Generator, qtype: str, answer: str, size: int) -> tuple[Attrs, Attrs]:
    n = int(answer) if qtype == "count_beeps" else int(rng.integers(1, MAX_BEEPS + 1))
    pitch = answer if qtype == "pitch" else str(rng.choice(list(PITCHES_HZ)))
    durations = rng.uniform(*BEEP_DURATION_S, size=n)
    slack = AUDIO_DURATION_S - durations.sum() - (n - 1) * BEEP_GAP_S - 2 * AUDIO_EDGE_S
    extra = rng.dirichlet(np.ones(n + 1)) * slack  # spare silence spread over the n + 1 gaps
    onsets, t = [], AUDIO_EDGE_S
    for dur, pad in zip(durations, extra):
        t += pad
        onsets.append(t)
        t += dur + BEEP_GAP_S
    return {
        "n_beeps": n,
        "pitch": pitch,
        "waveform": str(rng.choice(WAVEFORMS)),
        "frequency_hz": round(PITCHES_HZ[pitch] * (1 + rng.uniform(-PITCH_JITTER, PITCH_JITTER)), 1),
        "amplitude": round(float(rng.uniform(*BEEP_AMPLITUDE)), 3),
        "beeps_s": [[round(o, 4), round(float(d), 4)] for o, d in zip(onsets, durations)],
    }, {}


def render_beeps(attrs: Attrs, rng: np.random.Generator) -> np.ndarray:
    """The waveform of a beep sequence plus noise -> (AUDIO_SAMPLE_RATE * AUDIO_DURATION_S,) float32."""
    wave = np.zeros(int(AUDIO_SAMPLE_RATE * AUDIO_DURATION_S))
    f = attrs["frequency_hz"]
    harmonics = [1] if attrs["waveform"] == "sine" else list(range(1, int(AUDIO_SAMPLE_RATE / 2 / f) + 1, 2))
    fade = int(FADE_S * AUDIO_SAMPLE_RATE)
    for onset, dur in attrs["beeps_s"]:
        start, n = int(onset * AUDIO_SAMPLE_RATE), int(dur * AUDIO_SAMPLE_RATE)
        t = np.arange(n) / AUDIO_SAMPLE_RATE
        tone = sum(np.sin(2 * np.pi * k * f * t) / k for k in harmonics)  # odd harmonics: a square wave
        tone *= attrs["amplitude"] / np.abs(tone).max()
        ramp = 0.5 - 0.5 * np.cos(np.pi * np.arange(fade) / fade)
        tone[:fade] *= ramp
        tone[-fade:] *= ramp[::-1]
        wave[start : start + n] = tone
    wave += rng.normal(0, rng.uniform(*AUDIO_NOISE_STD), wave.shape)
    return wave.astype(np.float32)


def _write_audio(attrs: Attrs, path: Path, rng: np.random.Generator, size: int) -> None:
    sf.write(path, render_beeps(attrs, rng), AUDIO_SAMPLE_RATE, subtype="PCM_16")


def _audio_caption(attrs: Attrs) -> str:
    n = attrs["n_beeps"]
    return f"{NUMBER_WORDS[n]} {attrs['pitch']} {attrs['waveform']} beep{'s' if n > 1 else ''}"


# ----------------------------------------------------------------------------------------------- video


def _sample_video(rng: np.random.Generator, qtype: str, answer: str, size: int) -> tuple[Attrs, Attrs]:
    start, end = (np.array(VIDEO_TRAVEL) + rng.uniform(-0.04, 0.04, 2)) * size
    if answer in ("left", "up"):
        start, end = end, start
    across = rng.uniform(0.3, 0.7) * size
    horizontal = answer in ("left", "right")
    return {
        "direction": answer,
        "shape": str(rng.choice(SHAPES)),
        "color": str(rng.choice(list(COLORS))),
        "start": [round(start, 2), round(across, 2)] if horizontal else [round(across, 2), round(start, 2)],
        "end": [round(end, 2), round(across, 2)] if horizontal else [round(across, 2), round(end, 2)],
        "radius": round(VIDEO_SHAPE_RADIUS * size * (1 + rng.uniform(-SIZE_JITTER, SIZE_JITTER)), 2),
    }, {}


def render_motion(attrs: Attrs, size: int) -> np.ndarray:
    """Frames of one shape moving linearly from ``start`` to ``end`` -> (VIDEO_FRAMES, size, size, 3) uint8."""
    start, end = np.array(attrs["start"]), np.array(attrs["end"])
    frames = []
    for alpha in np.linspace(0.0, 1.0, VIDEO_FRAMES):
        center = (1 - alpha) * start + alpha * end
        shape = {
            "shape": attrs["shape"],
            "color": attrs["color"],
            "center": center,
            "radius": attrs["radius"],
        }
        frames.append(render_shapes([shape], size))
    return np.stack(frames)


@functools.cache
def video_codec() -> str:
    """The first codec of VIDEO_CODECS that this PyAV build can encode."""
    for name in VIDEO_CODECS:
        try:
            av.codec.Codec(name, "w")
        except Exception:  # PyAV raises UnknownCodecError (its class moved between versions)
            continue
        return name
    raise RuntimeError(f"PyAV {av.__version__} can encode none of {VIDEO_CODECS}; install a PyAV wheel")


def write_video(frames: np.ndarray, path: Path, fps: int = VIDEO_FPS) -> None:
    """Encode (F, H, W, 3) uint8 RGB frames (H, W even) as MP4, yuv420p."""
    codec = video_codec()
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps, options=VIDEO_CODEC_OPTIONS[codec])
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))


def _write_video(attrs: Attrs, path: Path, rng: np.random.Generator, size: int) -> None:
    write_video(render_motion(attrs, size), path)


def _video_caption(attrs: Attrs) -> str:
    return f"a {attrs['color']} {attrs['shape']} moving {attrs['direction']}"


# ----------------------------------------------------------------------------------------------- imu


def _sample_imu(rng: np.random.Generator, qtype: str, answer: str, size: int) -> tuple[Attrs, Attrs]:
    """Activity plus its jittered rhythm: step (or jump) rate, amplitudes and phase."""
    rate_hz = {"standing": 0.25, "walking": 1.8, "running": 2.8, "jumping": 1.0}[answer]
    vertical = {"standing": 0.03, "walking": 2.2, "running": 8.0, "jumping": 25.0}[answer]  # m/s^2
    return {
        "activity": answer,
        "rate_hz": round(rate_hz * rng.uniform(0.9, 1.1), 3),
        "vertical": round(vertical * rng.uniform(0.75, 1.25), 3),
        "phase": round(rng.uniform(0, 2 * np.pi), 4),
        "tilt": [round(v, 4) for v in rng.uniform(-MAX_TILT_RAD, MAX_TILT_RAD, 2)],
    }, {}


def _rotation(roll: float, pitch: float) -> np.ndarray:
    cr, sr, cp, sp = math.cos(roll), math.sin(roll), math.cos(pitch), math.sin(pitch)
    rx = np.array([[1, 0, 0], [0, cr, -sr], [0, sr, cr]])
    ry = np.array([[cp, 0, sp], [0, 1, 0], [-sp, 0, cp]])
    return ry @ rx


def render_imu(attrs: Attrs, rng: np.random.Generator) -> np.ndarray:
    """Body-frame accelerometer (x forward, y left, z up; specific force, so +g on z at rest) and gyroscope
    -> (IMU_SAMPLES, 7): timestamp s, acc m/s^2 (3), gyro rad/s (3)."""
    t = np.arange(IMU_SAMPLES) / IMU_RATE_HZ
    f, a, phase = attrs["rate_hz"], attrs["vertical"], attrs["phase"]
    theta = 2 * np.pi * f * t + phase  # step phase; a stride (left + right step) lasts two steps
    acc, gyro = np.zeros((IMU_SAMPLES, 3)), np.zeros((IMU_SAMPLES, 3))
    jitter = rng.uniform(0.8, 1.2, 6)
    activity = attrs["activity"]
    if activity == "standing":  # slow postural sway
        acc[:, 0] = a * jitter[0] * np.sin(theta)
        acc[:, 1] = a * jitter[1] * np.cos(theta)
        acc[:, 2] = GRAVITY
    elif activity in ("walking", "running"):
        # running: sharper heel strikes (more harmonics) and relatively more forward and lateral motion
        h2, h3, fwd, lat, spin = (
            (0.35, 0.0, 0.45, 0.25, 0.12) if activity == "walking" else (0.5, 0.25, 0.4, 0.2, 0.15)
        )
        acc[:, 2] = GRAVITY + a * (
            np.sin(theta) + h2 * np.sin(2 * theta + 0.5) + h3 * np.sin(3 * theta + 1.0)
        )
        acc[:, 0] = a * fwd * jitter[0] * np.sin(theta + np.pi / 2)
        acc[:, 1] = a * lat * jitter[1] * np.sin(theta / 2)
        gyro[:, 0] = a * spin * jitter[2] * np.sin(theta / 2 + 0.3)  # roll sways once a stride
        gyro[:, 1] = a * spin * 0.5 * jitter[3] * np.sin(theta + 0.8)  # pitch nods once a step
        gyro[:, 2] = a * spin * 0.7 * jitter[4] * np.sin(theta / 2 + 1.2)  # yaw twists once a stride
    elif activity == "jumping":
        p = np.mod(theta / (2 * np.pi), 1.0)  # phase within a jump, 0 = take-off
        flight = rng.uniform(0.3, 0.4)  # free fall: the accelerometer reads ~0 g
        landing = np.where(p >= flight, a * np.exp(-0.5 * ((p - flight) / (0.03 * f)) ** 2), 0.0)
        push_off = 0.35 * a * np.exp(-0.5 * ((p - 0.88) / 0.05) ** 2)
        acc[:, 2] = np.where(p < flight, 0.0, GRAVITY + landing + push_off)
        acc[:, 0] = 0.08 * a * jitter[0] * np.sin(theta + 1.0)
        acc[:, 1] = 0.04 * a * jitter[1] * np.sin(theta + 2.0)
        gyro[:, 1] = 0.6 * jitter[2] * np.sin(theta + 0.5)  # the torso pitches forward before take-off
        gyro[:, 0] = 0.15 * jitter[3] * np.sin(theta + 1.5)
    else:
        raise ValueError(f"unknown activity {activity!r}; choices: {', '.join(ACTIVITIES)}")
    rot = _rotation(*attrs["tilt"])
    acc = acc @ rot.T + rng.normal(0, rng.uniform(*ACC_NOISE_STD), acc.shape)
    gyro = gyro @ rot.T + rng.normal(0, rng.uniform(*GYRO_NOISE_STD), gyro.shape)
    return np.column_stack([t, acc, gyro])


def _write_imu(attrs: Attrs, path: Path, rng: np.random.Generator, size: int) -> None:
    fmt = ["%.2f"] + ["%.4f"] * 6
    np.savetxt(
        path, render_imu(attrs, rng), fmt=fmt, delimiter=",", header=",".join(IMU_COLUMNS), comments=""
    )


def _imu_caption(attrs: Attrs) -> str:
    return "a person standing still" if attrs["activity"] == "standing" else f"a person {attrs['activity']}"


# ----------------------------------------------------------------------------------------------- world


@dataclass(frozen=True)
class _ModalitySpec:
    sample: Callable[[np.random.Generator, str, str, int], tuple[Attrs, Attrs]]  # (rng, qtype, answer, size)
    write: Callable[[Attrs, Path, np.random.Generator, int], None]  # (attrs, path, rng, size)
    caption: Callable[[Attrs], str]


_SPECS: dict[str, _ModalitySpec] = {
    "image": _ModalitySpec(_sample_image, _write_image, _image_caption),
    "audio": _ModalitySpec(_sample_audio, _write_audio, _audio_caption),
    "video": _ModalitySpec(_sample_video, _write_video, _video_caption),
    "imu": _ModalitySpec(_sample_imu, _write_imu, _imu_caption),
}


def _question_schedule(rng: np.random.Generator, modality: str, n: int) -> list[tuple[str, str]]:
    """n (question type, answer) pairs: types and answers within each type balanced to +-1, shuffled."""
    qtypes = [q for q, spec in QUESTION_TYPES.items() if spec.modality == modality]
    counts = Counter(qtypes[i % len(qtypes)] for i in range(n))
    pairs = []
    for q in qtypes:
        choices = list(QUESTION_TYPES[q].choices)
        rng.shuffle(choices)  # which answers get the +1 when counts do not divide evenly
        pairs += [(q, choices[i % len(choices)]) for i in range(counts[q])]
    order = rng.permutation(len(pairs))
    return [pairs[i] for i in order]


def _answer(
    rng: np.random.Generator, qtype: str, attrs: Attrs, named: frozenset[str] = frozenset()
) -> tuple[str, Attrs] | None:
    """The answer to a ``qtype`` question about a sample and its template slots; None if it has no answer.

    For a follow-up turn: a colour question needs a shape that occurs exactly once; an existence
    question asks about a present or an absent shape with equal odds, never about a shape in ``named``
    (the shapes earlier turns asked about), and only when both a present and an absent candidate remain.
    Both rules close shortcuts a model learns instead of looking: a colour question only names present
    shapes, so "is there a X?" after "what colour is the X?" would be a free "yes"; and forcing an
    answer when one side is empty ties it to the count (one shape, already named: always "no"; three
    kinds: always "yes"; the follow-ups said "yes" 10% of the time for one shape and 70% for three, and
    the model answered by counting)."""
    if qtype in ("shape_color", "count_shapes", "shape_exists"):
        kinds = [s["shape"] for s in attrs["shapes"]]
        if qtype == "count_shapes":
            return str(len(kinds)), {}
        if qtype == "shape_color":
            unique = [k for k in SHAPES if kinds.count(k) == 1]
            if not unique:
                return None
            subject = str(rng.choice(unique))
            return attrs["shapes"][kinds.index(subject)]["color"], {"shape": subject}
        candidates = [k for k in SHAPES if k not in named]
        present = [k for k in candidates if k in kinds]
        absent = [k for k in candidates if k not in kinds]
        if not present or not absent:
            return None
        answer = "yes" if rng.random() < 0.5 else "no"
        return answer, {"shape": str(rng.choice(present if answer == "yes" else absent))}
    field = {
        "count_beeps": "n_beeps",
        "pitch": "pitch",
        "motion_direction": "direction",
        "activity": "activity",
    }
    return str(attrs[field[qtype]]), {}


def _follow_ups(
    rng: np.random.Generator, modality: str, first: str, attrs: Attrs, named: frozenset[str]
) -> list[dict[str, str]]:
    """Follow-up turns (question_type, question, answer) for every other question type of the modality;
    ``named``: the shapes the first question asked about."""
    turns = []
    for qtype in rng.permutation(
        [q for q, s in QUESTION_TYPES.items() if s.modality == modality and q != first]
    ):
        answered = _answer(rng, str(qtype), attrs, named)
        if answered is not None:
            question = str(rng.choice(QUESTION_TYPES[str(qtype)].templates)).format(**answered[1])
            turns.append({"question_type": str(qtype), "question": question, "answer": answered[0]})
            named = named | {answered[1]["shape"]} if "shape" in answered[1] else named
    return turns


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity where the OS reports one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


_CHUNK = 50
"""Samples per task of a ``workers`` pool: few enough tasks to keep the processes busy to the end."""


def _make_sample(
    out_dir: Path,
    split: str,
    key: tuple[int, int, int],
    modality: str,
    i: int,
    qtype: str,
    answer: str,
    size: int,
    multi_turn: bool,
) -> tuple[dict, dict, Attrs]:
    """Write sample ``i`` of one split and modality; returns (align record, instruct record, attributes).

    Everything random comes from the sample's own seed ``(*key, i)``, so samples can be made in any order
    and in any process with the same bytes."""
    spec = _SPECS[modality]
    rng = np.random.default_rng((*key, i))
    attrs, slots = spec.sample(rng, qtype, answer, size)
    rel = f"{MEDIA_DIRS[modality]}/{split}/{i:05d}.{MEDIA_EXTENSIONS[modality]}"
    spec.write(attrs, out_dir / rel, rng, size)
    sample_id = f"{split}-{modality}-{i:05d}"
    marker = f"<{modality}>"
    qspec = QUESTION_TYPES[qtype]
    question = str(rng.choice(qspec.templates)).format(**slots)
    align = {
        "id": sample_id,
        modality: rel,
        "conversations": [
            {"from": "human", "value": marker},
            {"from": "gpt", "value": spec.caption(attrs)},
        ],
    }
    instruct = {
        "id": sample_id,
        modality: rel,
        "conversations": [
            {"from": "human", "value": f"{marker}\n{question}"},
            {"from": "gpt", "value": answer},
        ],
        "question_type": qtype,
        "answer": answer,
        "choices": list(qspec.choices),
    }
    if multi_turn and split == "train":
        named = frozenset(v for v in slots.values() if v in question)  # the shapes it asks about
        turns = _follow_ups(rng, modality, qtype, attrs, named)
        for t in turns:
            instruct["conversations"] += [
                {"from": "human", "value": t["question"]},
                {"from": "gpt", "value": t["answer"]},
            ]
        instruct["turns"] = [{"question_type": qtype, "answer": answer}] + [
            {"question_type": t["question_type"], "answer": t["answer"]} for t in turns
        ]
    return align, instruct, {"modality": modality, modality: rel, **attrs}


def _make_samples(jobs: Sequence[tuple]) -> list[tuple[dict, dict, Attrs]]:
    """:func:`_make_sample` over a chunk of argument tuples (one pool task per chunk)."""
    return [_make_sample(*job) for job in jobs]


def _generate_split(
    out_dir: Path,
    split: str,
    seed: int,
    n: int,
    modalities: Sequence[str],
    sizes: dict[str, int],
    multi_turn: bool,
    pool: Executor | None = None,
) -> tuple[list[dict], list[dict], dict[str, Attrs]]:
    """Write the media of one split (in ``pool``'s processes when given); returns (align records, instruct
    records, attributes by id)."""
    jobs = []
    for modality in modalities:
        key = (seed, SPLITS.index(split), MODALITIES.index(modality))
        (out_dir / MEDIA_DIRS[modality] / split).mkdir(parents=True, exist_ok=True)
        for i, (qtype, answer) in enumerate(_question_schedule(np.random.default_rng(key), modality, n)):
            jobs.append((out_dir, split, key, modality, i, qtype, answer, sizes[modality], multi_turn))
    if pool is None:
        made = _make_samples(jobs)
    else:
        chunks = [jobs[k : k + _CHUNK] for k in range(0, len(jobs), _CHUNK)]
        made = [sample for chunk in pool.map(_make_samples, chunks) for sample in chunk]
    per_modality = [made[m * n : (m + 1) * n] for m in range(len(modalities))]
    attributes = {align["id"]: attrs for align, _, attrs in made}
    interleaved = [samples[i] for i in range(n) for samples in per_modality]  # image, audio, ... of sample i
    return [a for a, _, _ in interleaved], [q for _, q, _ in interleaved], attributes


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1) + "\n")


def generate_toyworld(
    out_dir: str | Path,
    *,
    seed: int = 0,
    n_train: int = DEFAULT_N_TRAIN,
    n_val: int = DEFAULT_N_VAL,
    n_test: int = DEFAULT_N_TEST,
    modalities: Sequence[str] = MODALITIES,
    image_size: int = 64,
    video_size: int = 64,
    multi_turn: bool = True,
    workers: int = 1,
) -> dict[str, Path]:
    """Generate the toy world under ``out_dir``; ``n_*`` count samples per modality per split.

    ``multi_turn``: training records also ask the modality's other question types as follow-up turns.
    ``workers``: processes that render and encode the media (the same bytes for any number).

    Returns the JSON files written: ``world``, ``align_{split}``, ``instruct_{split}``, ``attributes_{split}``
    (media live in ``images/``, ``audio/``, ``video/``, ``imu/`` next to them). Same arguments, same bytes
    (the MP4s too, with x264's deterministic default); the splits use different seeds.
    """
    unknown = [m for m in modalities if m not in MODALITIES]
    if unknown or not modalities:
        raise MMInputError(f"modalities {list(modalities)!r}: choose one or more of {', '.join(MODALITIES)}")
    counts = {"train": n_train, "val": n_val, "test": n_test}
    if any(n < 0 for n in counts.values()) or seed < 0:
        raise MMInputError(f"seed and sample counts must be >= 0, got seed={seed}, counts={counts}")
    if workers < 1:
        raise MMInputError(f"workers must be >= 1, got {workers}")
    if image_size < 16 or video_size < 16 or video_size % 2:
        raise MMInputError(
            f"image_size must be >= 16 and video_size even and >= 16, got {image_size}, {video_size}"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    modalities = [m for m in MODALITIES if m in modalities]  # canonical order
    sizes = {"image": image_size, "video": video_size, "audio": 0, "imu": 0}
    paths: dict[str, Path] = {}
    summary: dict[str, Any] = {}
    spawn = multiprocessing.get_context("spawn")  # no fork of a parent that may hold torch's threads
    with ProcessPoolExecutor(workers, mp_context=spawn) if workers > 1 else nullcontext() as pool:
        for split, n in counts.items():
            align, instruct, attributes = _generate_split(
                out, split, seed, n, modalities, sizes, multi_turn, pool
            )
            for name, records in (("align", align), ("instruct", instruct), ("attributes", attributes)):
                paths[f"{name}_{split}"] = out / f"{name}_{split}.json"
                _write_json(paths[f"{name}_{split}"], records)
            answers = {q: Counter() for q, s in QUESTION_TYPES.items() if s.modality in modalities and n}
            for r in instruct:
                answers[r["question_type"]][r["answer"]] += 1
            summary[split] = {
                "samples_per_modality": n,
                "align": len(align),
                "instruct": {q: sum(c.values()) for q, c in answers.items()},
                "answers": {q: dict(sorted(c.items())) for q, c in answers.items()},
                "turns": sum(len(r.get("turns", [r])) for r in instruct),
            }
    question_types = {
        q: {"modality": s.modality, "choices": list(s.choices), "chance": 1 / len(s.choices)}
        for q, s in QUESTION_TYPES.items()
        if s.modality in modalities
    }
    world = {
        "seed": seed,
        "modalities": modalities,
        "splits": summary,
        "question_types": question_types,
        "media": {
            "image": {"size": image_size, "format": "png", "shapes": list(SHAPES), "colors": list(COLORS)},
            "audio": {"sample_rate": AUDIO_SAMPLE_RATE, "duration_s": AUDIO_DURATION_S, "format": "wav"},
            "video": {
                "size": video_size,
                "frames": VIDEO_FRAMES,
                "fps": VIDEO_FPS,
                "codec": video_codec() if "video" in modalities else None,
            },
            "imu": {"rate_hz": IMU_RATE_HZ, "samples": IMU_SAMPLES, "columns": list(IMU_COLUMNS)},
        },
        "files": {k: p.name for k, p in paths.items()},
    }
    world["media"] = {m: v for m, v in world["media"].items() if m in modalities}
    paths["world"] = out / "world.json"
    _write_json(paths["world"], world)
    return paths


# ----------------------------------------------------------------------------------------------- CLI


def run_toyworld(args: argparse.Namespace) -> dict[str, Path]:
    """Generate the toy world from parsed ``add_toyworld_args`` options and print where it went (options
    left out take ``generate_toyworld``'s defaults)."""
    given = {
        "n_train": args.n_train,
        "n_val": args.n_val,
        "n_test": args.n_test,
        "modalities": args.modalities,
    }
    paths = generate_toyworld(
        args.out,
        seed=args.seed,
        image_size=args.image_size,
        video_size=args.video_size,
        multi_turn=not args.single_turn,
        workers=args.workers if args.workers is not None else usable_cores(),
        **{name: value for name, value in given.items() if value is not None},
    )
    world = json.loads(paths["world"].read_text())
    for split, s in world["splits"].items():
        print(
            f"{split}: {s['align']} captions, {sum(s['instruct'].values())} conversations, {s['turns']} questions"
        )
    print(f"toy world written to {args.out} (summary: {paths['world']})")
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mm_llama.data.toyworld --out DIR``."""
    parser = add_toyworld_args(
        argparse.ArgumentParser(prog="mm-llama toyworld", description=__doc__.split("\n")[0])
    )
    run_toyworld(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
