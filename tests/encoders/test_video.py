"""Video encoder: PyAV decoding of files the tests write, frame sampling, aggregation shapes, freezing,
bad files, and a tiny MultimodalLM (plus the real SmolLM2) with video and raw-patch inputs."""

from __future__ import annotations

import copy
import io
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import torch

from mm_llama import EncoderConfig, LLMConfig, ModalityConfig, ModelConfig, MultimodalLM, ProjectorConfig
from mm_llama.encoders import build_encoder
from mm_llama.encoders.video import VideoEncoder, fps_indices, uniform_indices
from tests.conftest import TINY_CLIP, tiny_llm_config

N_FRAMES_FILE = 12
FILE_FPS = 12
SIZE = 48
SQUARE = 10
STEP = 3  # the square moves this many pixels right per frame
N_FRAME_TOKENS = 16  # the tiny CLIP: 32 px / 8 px patches = 4 x 4, CLS dropped
CLIP_WIDTH = 32
CONTAINERS = {"mp4": ("mp4", "libx264"), "webm": ("webm", "libvpx-vp9"), "avi": ("avi", "mpeg4")}


def square_frames(n: int = N_FRAMES_FILE) -> np.ndarray:
    """(n, 48, 48, 3) uint8: a white square moving right on black, ``STEP`` pixels per frame."""
    frames = np.zeros((n, SIZE, SIZE, 3), dtype=np.uint8)
    for i in range(n):
        frames[i, 19 : 19 + SQUARE, 2 + STEP * i : 2 + STEP * i + SQUARE] = 255
    return frames


def write_video(path: Path, frames: np.ndarray, codec: str, fmt: str, fps: int = FILE_FPS) -> Path:
    """Encode (F, H, W, 3) uint8 frames with PyAV."""
    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The moving-square clip (12 frames at 12 fps) as mp4 (H.264), webm (VP9) and avi (MPEG-4)."""
    folder = tmp_path_factory.mktemp("videos")
    return {
        ext: write_video(folder / f"square.{ext}", square_frames(), codec, fmt)
        for ext, (fmt, codec) in CONTAINERS.items()
    }


def video_options(**overrides: Any) -> dict[str, Any]:
    frame_encoder = {"type": "hf_vision", "options": {"config": copy.deepcopy(TINY_CLIP)}}
    return {"frame_encoder": frame_encoder, "num_frames": 4, **overrides}


def video_encoder(**overrides: Any) -> VideoEncoder:
    torch.manual_seed(0)
    return build_encoder("video", EncoderConfig(type="video", options=video_options(**overrides)))


def square_x(frames: np.ndarray) -> list[float]:
    """The horizontal centre of the bright square in each frame."""
    return [float(np.argwhere(f.mean(axis=-1) > 128)[:, 1].mean()) for f in frames]


def test_uniform_and_fps_indices() -> None:
    assert uniform_indices(12, 4) == [1, 4, 7, 10]
    assert uniform_indices(3, 8) == [0, 0, 0, 1, 1, 2, 2, 2]  # fewer frames: nearest frames repeat
    assert fps_indices(12, native_fps=12.0, fps=4.0, max_count=8) == [0, 3, 6, 9]
    assert fps_indices(12, native_fps=12.0, fps=12.0, max_count=4) == [1, 4, 7, 10]  # capped, spread
    assert fps_indices(5, native_fps=10.0, fps=30.0, max_count=8) == [0, 1, 2, 3, 4]  # never above native
    assert fps_indices(30, native_fps=30.0, fps=1.0, max_count=8) == [0]


@pytest.mark.parametrize("ext", sorted(CONTAINERS))
def test_decodes_every_container_in_order(videos: dict[str, Path], ext: str) -> None:
    frames = video_encoder().preprocessor.load_frames(videos[ext])
    assert frames.shape == (4, SIZE, SIZE, 3) and frames.dtype == np.uint8
    expected = [2 + STEP * i + (SQUARE - 1) / 2 for i in uniform_indices(N_FRAMES_FILE, 4)]
    np.testing.assert_allclose(square_x(frames), expected, atol=1.5)  # lossy codecs blur edges


def test_fps_sampling_of_a_file(videos: dict[str, Path]) -> None:
    encoder = video_encoder(sampling="fps", fps=3.0, num_frames=8)
    frames = encoder.preprocessor.load_frames(videos["mp4"])  # 1 s at 12 fps, every 4th frame
    np.testing.assert_allclose(square_x(frames), [2 + STEP * i + 4.5 for i in (0, 4, 8)], atol=1.5)
    assert encoder.preprocess(videos["mp4"]).shape == (3, 3, 32, 32)
    capped = video_encoder(sampling="fps", fps=12.0, num_frames=5).preprocessor.load_frames(videos["webm"])
    assert len(capped) == 5


def test_inputs_path_bytes_array_tensor(videos: dict[str, Path]) -> None:
    encoder = video_encoder()
    from_path = encoder.preprocess(videos["avi"])
    assert from_path.shape == (4, 3, 32, 32)  # (F, C, H, W) in the tiny CLIP's resolution
    torch.testing.assert_close(encoder.preprocess(videos["avi"].read_bytes()), from_path)
    torch.testing.assert_close(encoder.preprocess(str(videos["avi"])), from_path)
    raw = square_frames()
    from_array = encoder.preprocess(raw)
    torch.testing.assert_close(encoder.preprocess(torch.from_numpy(raw)), from_array)
    torch.testing.assert_close(encoder.preprocess(raw.astype(np.float32) / 255.0), from_array)
    frame_encoder = encoder.frame_encoder
    expected = torch.stack([frame_encoder.preprocess(raw[i]) for i in uniform_indices(N_FRAMES_FILE, 4)])
    torch.testing.assert_close(from_array, expected)  # each frame got the backbone's own preprocessing


def test_short_clip_repeats_frames() -> None:
    encoder = video_encoder(num_frames=8)
    raw = square_frames(3)
    frames = encoder.preprocessor.load_frames(raw)
    assert frames.shape == (8, SIZE, SIZE, 3)
    np.testing.assert_array_equal(frames, raw[[0, 0, 0, 1, 1, 2, 2, 2]])
    assert encoder.preprocess(raw).shape == (8, 3, 32, 32)


@pytest.mark.parametrize(
    ("aggregation", "tokens"), [("keep", 4 * N_FRAME_TOKENS), ("mean", N_FRAME_TOKENS), ("pool", 6)]
)
def test_aggregation_shapes(aggregation: str, tokens: int) -> None:
    encoder = video_encoder(aggregation=aggregation, pooled_tokens=6)
    x = encoder.preprocess(square_frames())
    out = encoder(torch.stack([x, x.flip(0)]))  # (B, F, C, H, W) -> (B, M, D)
    assert out.shape == (2, tokens, CLIP_WIDTH)
    assert encoder.num_tokens(x) == tokens
    assert encoder.output_dim == CLIP_WIDTH
    assert (encoder.temporal_embedding is None) == (aggregation == "mean")


def test_temporal_embedding_tells_frames_apart() -> None:
    encoder = video_encoder(aggregation="keep").eval()
    still = encoder.preprocess(np.repeat(square_frames(1), 4, axis=0))  # four identical frames
    with torch.no_grad():
        tokens = encoder(still[None]).unflatten(1, (4, N_FRAME_TOKENS))  # (1, F, N, D)
        mean = video_encoder(aggregation="mean")(still[None])  # same seed: the same backbone
    shift = encoder.temporal_embedding[1] - encoder.temporal_embedding[0]  # (D,)
    torch.testing.assert_close(tokens[0, 1] - tokens[0, 0], shift.expand(N_FRAME_TOKENS, -1).detach())
    torch.testing.assert_close(mean[0], tokens[0, 0] - encoder.temporal_embedding[0].detach())


def test_fps_clips_of_different_lengths_share_the_temporal_embedding() -> None:
    encoder = video_encoder(sampling="fps", fps=2.0, num_frames=6, array_fps=4.0)
    short, long = encoder.preprocess(square_frames(4)), encoder.preprocess(square_frames(12))
    assert short.shape[0] == 2 and long.shape[0] == 6
    assert encoder(short[None]).shape == (1, 2 * N_FRAME_TOKENS, CLIP_WIDTH)
    with pytest.raises(ValueError, match=r"got 7 frames per clip but options.num_frames=6"):
        encoder(torch.cat([long, long[:1]])[None])


def test_freeze_keeps_the_temporal_embedding_trainable() -> None:
    options = video_options()
    frozen = build_encoder("video", EncoderConfig(type="video", options=options, freeze=True))
    trainable = {name for name, p in frozen.named_parameters() if p.requires_grad}
    assert trainable == {"temporal_embedding"}
    scratch = build_encoder("video", EncoderConfig(type="video", options=options))
    assert not scratch.is_pretrained and all(p.requires_grad for p in scratch.parameters())


def test_a_stage_that_trains_no_encoder_freezes_the_temporal_embedding_too() -> None:
    """``train_encoders: none`` freezes all of an encoder (so its features can be cached); ``auto`` trains
    the temporal embedding above a frozen frame encoder."""
    from mm_llama.train.config import StageConfig
    from mm_llama.train.freeze import freeze_for_stage

    encoder = EncoderConfig(type="video", options=video_options(), freeze=True)
    config = ModelConfig(
        llm=tiny_llm_config(),
        modalities={"video": ModalityConfig(encoder=encoder, projector=ProjectorConfig(type="mlp2x_gelu"))},
    )
    model = MultimodalLM(config)
    video = model.encoders["video"]
    freeze_for_stage(model, StageConfig(data=["x.json"], train_encoders="none"))
    assert not any(p.requires_grad for p in video.parameters()) and not video.training
    freeze_for_stage(model, StageConfig(data=["x.json"], train_encoders="auto"))
    assert {n for n, p in video.named_parameters() if p.requires_grad} == {"temporal_embedding"}


def test_bad_options() -> None:
    with pytest.raises(ValueError, match=r"frame_encoder.freeze unset"):
        video_encoder(frame_encoder={"type": "hf_vision", "options": {"config": TINY_CLIP}, "freeze": True})
    with pytest.raises(ValueError, match=r"unknown encoder 'vit'; valid choices: .*hf_vision"):
        video_encoder(frame_encoder={"type": "vit"})
    with pytest.raises(ValueError, match=r"options.num_frames must be >= 1, got 0"):
        video_encoder(num_frames=0)
    with pytest.raises(ValueError, match=r"aggregation: expected one of \['keep', 'mean', 'pool'\]"):
        video_encoder(aggregation="max")
    with pytest.raises(
        ValueError, match=r"modalities.video.encoder.options: missing required field 'frame_encoder'"
    ):
        build_encoder("video", EncoderConfig(type="video"))


def test_bad_frame_arrays() -> None:
    encoder = video_encoder()
    with pytest.raises(ValueError, match=r"\(F, H, W, C\).*got shape \(48, 48, 3\)"):
        encoder.preprocess(square_frames()[0])
    with pytest.raises(ValueError, match=r"got shape \(0, 48, 48, 3\)"):
        encoder.preprocess(square_frames(0))
    with pytest.raises(ValueError, match=r"<frame array>: its frame rate is unknown.*array_fps"):
        video_encoder(sampling="fps").preprocess(square_frames())


@pytest.mark.parametrize(
    ("ext", "kept", "problem"),
    [
        ("mp4", 0.5, "not a readable video file"),  # PyAV writes the index (moov) at the end
        ("webm", 0.9, "is truncated or damaged: its header declares 12 frames but only 9 are present"),
        ("avi", 0.9, "is truncated or damaged: its header declares 12 frames but only 1 are present"),
    ],
)
def test_truncated_files_name_the_file(
    videos: dict[str, Path], tmp_path: Path, ext: str, kept: float, problem: str
) -> None:
    data = videos[ext].read_bytes()
    truncated = tmp_path / f"truncated.{ext}"
    truncated.write_bytes(data[: int(len(data) * kept)])
    with pytest.raises(ValueError, match=rf"video \S*truncated\.{ext}:? {problem}"):
        video_encoder().preprocess(truncated)


def test_corrupt_and_missing_files(tmp_path: Path) -> None:
    encoder = video_encoder()
    corrupt = tmp_path / "corrupt.webm"
    corrupt.write_bytes(b"\x1a\x45\xdf\xa3" + bytes(range(256)) * 8)
    with pytest.raises(ValueError, match=r"corrupt\.webm"):
        encoder.preprocess(corrupt)
    with pytest.raises(ValueError, match=r"<video bytes>: not a readable video file"):
        encoder.preprocess(b"not a video at all" * 10)
    with pytest.raises(FileNotFoundError, match=r"video file not found: .*missing\.mp4"):
        encoder.preprocess(tmp_path / "missing.mp4")


def test_video_without_decodable_frames(tmp_path: Path) -> None:
    empty = tmp_path / "empty.avi"  # a valid AVI header with a video stream and no frames
    with av.open(str(empty), "w", format="avi") as container:
        stream = container.add_stream("mpeg4", rate=FILE_FPS)
        stream.width = stream.height = SIZE
        container.start_encoding()
    with pytest.raises(ValueError, match=r"video .*empty\.avi has no decodable frames"):
        video_encoder().preprocess(empty)
    audio_only = io.BytesIO()
    with av.open(audio_only, "w", format="wav") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), dtype=np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        container.mux(stream.encode(frame))
    with pytest.raises(ValueError, match=r"video <video bytes> has no video stream"):
        video_encoder().preprocess(audio_only.getvalue())


def video_and_patches_config(llm: LLMConfig) -> ModelConfig:
    """Video (tiny CLIP per frame, temporal embedding, resampler) and Fuyu patches (linear) slots."""
    return ModelConfig(
        llm=llm,
        modalities={
            "video": ModalityConfig(
                encoder=EncoderConfig(type="video", options=video_options()),
                projector=ProjectorConfig(
                    type="resampler", options={"num_latents": 8, "dim": 32, "heads": 4}
                ),
            ),
            "image": ModalityConfig(
                encoder=EncoderConfig(type="patches", options={"patch_size": 8, "max_height": 32}),
                projector=ProjectorConfig(type="linear"),
            ),
        },
        system_prompt="Be brief.",
    )


def test_tiny_model_with_video_and_patches(videos: dict[str, Path]) -> None:
    torch.manual_seed(0)
    model = MultimodalLM(video_and_patches_config(tiny_llm_config()))
    image = np.random.default_rng(0).integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    conversation = [
        {"role": "user", "content": "<video> then <image>: what moves?"},
        {"role": "assistant", "content": "A square."},
    ]
    example = model.processor(conversation, {"video": [videos["mp4"]], "image": [image]})
    ids = example.input_ids
    assert ids.count(model.processor.placeholder_ids["video"]) == 8  # the resampler's latents
    assert ids.count(model.processor.placeholder_ids["image"]) == 3 * (
        4 + 1
    )  # 20x30 px -> 3 rows of 4 + break
    batch = model.processor.collate([example])
    out = model(**batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for name in ("video", "image"):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.projectors[name].parameters())
    assert model.encoders["video"].temporal_embedding.grad.abs().sum() > 0
    answer = model.generate(
        "<video>\nWhat moves in it, and in <image>?",
        videos=[videos["webm"]],
        images=[image],
        max_new_tokens=4,
    )
    assert isinstance(answer, str)
    pieces = list(model.generate("<video>", videos=[square_frames()], max_new_tokens=3, stream=True))
    assert all(isinstance(p, str) for p in pieces)


@pytest.mark.slow
def test_real_smollm2_answers_about_a_video(videos: dict[str, Path]) -> None:
    torch.manual_seed(0)
    model = MultimodalLM(video_and_patches_config(LLMConfig(name_or_path="smollm2-135m"))).eval()
    batch = model.prepare(["<video>\nWhat is the capital of France?"], {"video": [[videos["mp4"]]]})
    assert int((batch["input_ids"] == model.processor.placeholder_ids["video"]).sum()) == 8
    answer = model.generate(
        "<video>\nWhat is the capital of France?", videos=[videos["mp4"]], max_new_tokens=12
    )
    assert isinstance(answer, str) and answer.strip()
