"""How long building the dataset index takes at LLaVA scale, and what it costs in memory.

``synthesize`` writes a conversation file with the shapes of LLaVA-1.5's ``llava_v1_5_mix665k.json``:
its ten sources in their published proportions (LLaVA-Instruct, VQAv2, OKVQA, A-OKVQA, RefCOCO, GQA,
OCR-VQA, TextVQA, Visual Genome, ShareGPT), single- and multi-turn, short VQA answers and long
replies, ShareGPT's text-only records with no ``image`` key, the ``<image>`` marker first or last in the
first human turn, ids of mixed types (ints and strings, as in the real file), images under the real
file's folders (``coco/train2017``, ``gqa/images``, ``ocr_vqa/images``, ``textvqa/train_images``,
``vg/VG_100K``, ``vg/VG_100K_2``). Every referenced image exists: a few thousand distinct tiny JPEGs,
hard-linked under each record's own path, so the media check stats as many files as the real data has.

``measure`` then builds a ``ConversationDataset`` on it twice with a tiny random model's processor:
the first build loads the records, checks every media file and estimates every length, and writes the
index beside the data; the second reads it back. It reports both times and the process's peak memory.

    python benchmarks/bench_index.py --data-dir /tmp/mix665k [--records 665298] [--out results.json]

Timings mean something only on an otherwise idle machine (see ``benchmarks/README.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

MIX665K_RECORDS = 665_298


@dataclass(frozen=True)
class Source:
    """One of mix665k's sources: how many records, its image folder and naming, its conversation shape."""

    name: str
    records: int
    folder: str | None
    """Image folder under the data root; ``None``: text-only records (no ``image`` key)."""
    unique_images: int
    turns: tuple[int, int]
    """Question-answer rounds per record: uniform in [low, high]."""
    long_replies: bool
    int_ids: bool
    """Whether the real file writes this source's ids as JSON numbers."""


SOURCES = (  # the record counts are the published mix665k composition; they sum to 665,298
    Source("llava_instruct", 157_712, "coco/train2017", 81_479, (1, 5), True, False),
    Source("vqav2", 82_783, "coco/train2017", 82_783, (3, 8), False, False),
    Source("okvqa", 8_998, "coco/train2017", 8_998, (1, 1), False, False),
    Source("aokvqa", 66_160, "coco/train2017", 16_540, (1, 1), False, False),
    Source("refcoco", 48_447, "coco/train2017", 16_994, (2, 6), False, False),
    Source("gqa", 72_140, "gqa/images", 72_140, (4, 12), False, False),
    Source("ocr_vqa", 80_000, "ocr_vqa/images", 80_000, (3, 6), False, True),
    Source("textvqa", 21_953, "textvqa/train_images", 21_953, (1, 1), False, False),
    Source("vg", 86_417, "vg/VG_100K", 86_417, (4, 12), False, True),
    Source("sharegpt", 40_688, None, 0, (1, 6), True, False),
)
DISTINCT_IMAGES = 2_000
"""Distinct tiny JPEGs behind all the hard links."""
TEXT_POOL = 4_000
"""Distinct questions and replies of each kind the records draw from."""
WORDS = (
    "the a of and in on with what is are this that image picture photo man woman dog cat table car street "
    "red blue green white black left right front behind two three many some color shape sign text number "
    "building tree sky water person people standing sitting holding wearing looking near under above"
).split()


def _texts(rng: np.random.Generator, count: int, words: tuple[int, int]) -> list[str]:
    """``count`` random sentences of ``words`` (low, high) words each."""
    lengths = rng.integers(words[0], words[1] + 1, size=count)
    vocab = np.array(WORDS)
    return [" ".join(vocab[rng.integers(0, len(vocab), size=n)]) for n in lengths]


def _write_images(root: Path, rng: np.random.Generator, count: int) -> list[Path]:
    """The distinct tiny JPEGs (8 x 8 px, random colours) that every image path links to."""
    folder = root / ".distinct"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"{i:05d}.jpg"
        if not path.exists():
            pixels = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def _image_name(source: Source, k: int) -> str:
    """The real file's naming in each folder (VG's second folder takes the upper half of its ids)."""
    if source.folder == "coco/train2017":
        return f"coco/train2017/{k:012d}.jpg"
    if source.name == "vg":
        return f"vg/VG_100K{'_2' if k % 2 else ''}/{k + 1}.jpg"
    if source.name == "textvqa":
        return f"textvqa/train_images/{k:016x}.jpg"
    return f"{source.folder}/{k}.jpg"


def synthesize(
    out_dir: str | Path, records: int = MIX665K_RECORDS, seed: int = 0, distinct_images: int = DISTINCT_IMAGES
) -> Path:
    """Write ``mix.json`` (``records`` records, the sources scaled to that total) and its images
    (``distinct_images`` files behind the links) under ``out_dir``; return the file's path. Images
    already there are reused."""
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    distinct = _write_images(out_dir, rng, distinct_images)
    scale = records / MIX665K_RECORDS
    counts = [max(1, round(s.records * scale)) for s in SOURCES]
    counts[0] += records - sum(counts)  # exact total
    questions = _texts(rng, TEXT_POOL, (4, 16))
    short = _texts(rng, TEXT_POOL, (1, 3))
    long = _texts(rng, TEXT_POOL, (40, 260))
    rows: list[dict[str, Any]] = []
    for source, count in zip(SOURCES, counts):
        unique = max(1, round(source.unique_images * scale)) if source.folder else 0
        image_ids = rng.integers(0, unique, size=count) if unique else None
        rounds = rng.integers(source.turns[0], source.turns[1] + 1, size=count)
        q_idx = rng.integers(0, TEXT_POOL, size=int(rounds.sum()) + 1)
        a_idx = rng.integers(0, TEXT_POOL, size=int(rounds.sum()) + 1)
        replies = long if source.long_replies else short
        marker_last = rng.random(count) < 0.5
        drawn = 0
        for r in range(count):
            conversation = []
            for t in range(int(rounds[r])):
                question = questions[q_idx[drawn]]
                if t == 0 and image_ids is not None:
                    question = f"{question}\n<image>" if marker_last[r] else f"<image>\n{question}"
                conversation.append({"from": "human", "value": question})
                conversation.append({"from": "gpt", "value": replies[a_idx[drawn]]})
                drawn += 1
            number = len(rows)
            row: dict[str, Any] = {"id": number if source.int_ids else f"{source.name}_{number:07d}"}
            if image_ids is not None:
                row["image"] = _image_name(source, int(image_ids[r]))
            row["conversations"] = conversation
            rows.append(row)
    order = rng.permutation(len(rows))  # the real file interleaves its sources
    path = out_dir / "mix.json"
    with open(path, "w") as f:
        json.dump([rows[i] for i in order], f)
    _link_images(out_dir, {row["image"] for row in rows if "image" in row}, distinct)
    return path


def _link_images(root: Path, names: set[str], distinct: list[Path]) -> None:
    """Hard-link each referenced image path to one of the distinct files (cheap: no data is copied)."""
    folders = {str(Path(n).parent) for n in names}
    for folder in folders:
        (root / folder).mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(sorted(names)):
        target = root / name
        if not target.exists():
            os.link(distinct[i % len(distinct)], target)


def peak_rss_mib() -> float:
    """This process's peak resident memory (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


CLIP_L_336 = {  # CLIP ViT-L/14-336's geometry (576 patches), no weights: only the token count is used
    "model_type": "clip_vision_model",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "image_size": 336,
    "patch_size": 14,
}


def llava_processor() -> Any:
    """A processor shaped like LLaVA-1.5's: SmolLM2's tokenizer, 576 placeholders per image."""
    from mm_llama import EncoderConfig, LLMConfig, ModalityConfig, ModelConfig, ProjectorConfig
    from mm_llama.processor import MultimodalProcessor

    image = ModalityConfig(
        encoder=EncoderConfig(type="hf_vision", options={"config": CLIP_L_336, "aspect": "pad"}),
        projector=ProjectorConfig(type="mlp2x_gelu"),
    )
    return MultimodalProcessor.from_config(ModelConfig(llm=LLMConfig(), modalities={"image": image}))


def measure(data: Path) -> dict[str, Any]:
    """Build the dataset index twice (built, then read back) and time each build."""
    from mm_llama.data.dataset import ConversationDataset

    processor = llava_processor()
    results: dict[str, Any] = {}
    for name in ("build", "cached"):
        start = time.perf_counter()
        dataset = ConversationDataset(data, processor)
        lengths = dataset.lengths
        results[f"{name}_s"] = round(time.perf_counter() - start, 2)
        results[f"{name}_from_cache"] = dataset.index_from_cache
    results["records"] = len(dataset)
    results["distinct_media_files"] = sum(i.distinct_media for i in dataset.indexes)
    results["text_only_records"] = int(
        sum(
            int((sum(i.items.values()) == 0).sum()) if i.items else len(i.text_tokens)
            for i in dataset.indexes
        )
    )
    results["mean_length"] = round(float(np.mean(lengths)), 1)
    results["peak_rss_mib"] = round(peak_rss_mib(), 1)
    return results


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, required=True, help="where the file and images go")
    parser.add_argument("--records", type=int, default=MIX665K_RECORDS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--distinct-images", type=int, default=DISTINCT_IMAGES, help="files behind the links")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    data = args.data_dir / "mix.json"
    if not data.is_file():
        print(f"synthesizing {args.records} records under {args.data_dir} ...", file=sys.stderr)
        synthesize(args.data_dir, args.records, args.seed, args.distinct_images)
    results = {
        "data": str(data),
        "data_bytes": data.stat().st_size,
        "machine": {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()},
        **measure(data),
    }
    print(json.dumps(results, indent=2))
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
