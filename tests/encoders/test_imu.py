"""IMU: CSV / NPY / NPZ readers on files the tests write (timestamps at an odd rate, declared rates),
resampling, normalization, windows and chunks, both encoders (shapes, weights files), and bad files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mm_llama import EncoderConfig
from mm_llama.encoders import build_encoder
from mm_llama.encoders.imu import (
    IMUConvEncoder,
    IMUConvOptions,
    IMUTransformerEncoder,
    IMUTransformerOptions,
    load_imu,
)

ODD_RATE = 173.0  # Hz: the CSV fixture's rate, resampled to the encoder's 200 Hz
SECONDS = 2.0
COLUMNS = ["acc_x", "acc_y", "acc_z", "gyro_x", "gyro_y", "gyro_z"]
FREQS = np.array([0.5, 1.0, 1.5, 2.0, 2.5, 3.0])  # Hz, one slow sine per channel
TINY_TRANSFORMER: dict[str, Any] = {"window": 400, "width": 32, "depth": 1, "heads": 2}
TINY_CNN: dict[str, Any] = {"window": 400, "width": 16, "layers": 3}


def signal(times: np.ndarray) -> np.ndarray:
    """(T, 6) channel c = (c + 1) * sin(2 pi f_c t) + c: different scales and offsets per channel."""
    channels = np.arange(6)
    return (channels + 1) * np.sin(2 * np.pi * FREQS * times[:, None]) + channels


def write_csv(path: Path, times: np.ndarray | None, values: np.ndarray, header: list[str] | None) -> Path:
    rows = values if times is None else np.column_stack([times, values])
    lines = [",".join(header)] if header is not None else []
    lines += [",".join(repr(float(v)) for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def csv_file(tmp_path: Path) -> Path:
    """2 s at 173 Hz with millisecond timestamps (starting at an epoch-like offset) and a little jitter."""
    rng = np.random.default_rng(0)
    times = np.arange(int(SECONDS * ODD_RATE)) / ODD_RATE
    times[1:-1] += rng.uniform(-0.3, 0.3, size=len(times) - 2) / ODD_RATE
    return write_csv(
        tmp_path / "walk.csv", 1.7e12 + times * 1000.0, signal(times), ["timestamp_ms", *COLUMNS]
    )


def test_csv_with_timestamps_at_an_odd_rate_resamples_to_200hz(csv_file: Path) -> None:
    x = load_imu(csv_file, sample_rate=200.0)
    last = (int(SECONDS * ODD_RATE) - 1) / ODD_RATE
    assert x.shape == (6, int(last * 200) + 1) and x.dtype == torch.float32
    expected = signal(np.arange(x.shape[1]) / 200.0).T
    assert np.abs(x.numpy() - expected).max() < 0.02  # linear interpolation of slow sines


def test_timestamp_units_are_inferred_or_named(tmp_path: Path) -> None:
    times = np.arange(100) / 50.0  # 50 Hz
    values = signal(times)
    seconds = load_imu(write_csv(tmp_path / "s.csv", times, values, ["time", *COLUMNS]), sample_rate=50.0)
    micros = load_imu(write_csv(tmp_path / "us.csv", times * 1e6, values, ["t", *COLUMNS]), sample_rate=50.0)
    assert seconds.shape == micros.shape == (6, 100)
    assert torch.allclose(seconds, micros, atol=1e-5)
    named = write_csv(tmp_path / "named.csv", times * 1e3, values, ["ts (ms)", *COLUMNS])
    assert torch.allclose(load_imu(named, sample_rate=50.0), seconds, atol=1e-5)


def test_declared_rate_npy_npz_and_arrays(tmp_path: Path) -> None:
    times = np.arange(300) / 100.0  # 100 Hz
    values = signal(times)
    no_stamps = write_csv(tmp_path / "plain.csv", None, values, None)
    from_csv = load_imu(no_stamps, sample_rate=200.0, input_rate=100.0)
    assert from_csv.shape == (6, 599)
    assert np.abs(from_csv.numpy() - signal(np.arange(599) / 200.0).T).max() < 0.03

    np.save(tmp_path / "rec.npy", values.T)  # (C, T) is accepted too
    assert torch.allclose(load_imu(tmp_path / "rec.npy", sample_rate=200.0, input_rate=100.0), from_csv)
    np.savez(tmp_path / "rate.npz", imu=values, sample_rate=100.0)
    assert torch.allclose(load_imu(tmp_path / "rate.npz", sample_rate=200.0), from_csv)
    np.savez(tmp_path / "stamps.npz", data=values, timestamps=times)
    assert torch.allclose(load_imu(tmp_path / "stamps.npz", sample_rate=200.0), from_csv, atol=1e-6)
    assert torch.allclose(
        load_imu((tmp_path / "stamps.npz").read_bytes(), sample_rate=200.0), from_csv, atol=1e-6
    )

    assert torch.allclose(load_imu((values, 100.0), sample_rate=200.0), from_csv)
    at_rate = load_imu(torch.from_numpy(values), sample_rate=100.0)  # arrays: already at the encoder's rate
    assert torch.allclose(at_rate, torch.from_numpy(values.T).float())


def test_preprocess_normalizes_windows_and_chunks(csv_file: Path) -> None:
    encoder = IMUTransformerEncoder(IMUTransformerOptions(**TINY_TRANSFORMER))
    raw = load_imu(csv_file)  # (6, 346) at 200 Hz: shorter than the 400-sample window
    x = encoder.preprocess(csv_file)
    assert x.shape == (6, 400)
    body = x[:, : raw.shape[1]]
    assert torch.allclose(body.mean(dim=1), torch.zeros(6), atol=1e-5)  # per-channel z-score
    assert torch.allclose(body.std(dim=1, unbiased=False), torch.ones(6), atol=1e-4)
    assert torch.all(x[:, raw.shape[1] :] == 0)  # padded with the channel mean

    chunked = IMUTransformerEncoder(
        IMUTransformerOptions(**{**TINY_TRANSFORMER, "window": 128}, chunk=True, max_chunks=2)
    )
    xs = chunked.preprocess(csv_file)
    assert xs.shape == (2, 6, 128)  # 346 samples = 3 windows of 128, capped at 2
    clipped = IMUTransformerEncoder(IMUTransformerOptions(**{**TINY_TRANSFORMER, "window": 128}))
    assert torch.equal(clipped.preprocess(csv_file), xs[0])

    fixed = IMUTransformerEncoder(
        IMUTransformerOptions(**TINY_TRANSFORMER, normalize="fixed", mean=[0.0] * 6, std=[2.0] * 6)
    )
    assert torch.allclose(fixed.preprocess(csv_file)[:, : raw.shape[1]], raw / 2.0)


@pytest.mark.parametrize(
    ("select", "tokens"), [("cls_patch", 51), ("patch", 50), ("cls", 1)]
)  # 400 samples / patches of 8 = 50
def test_imu_transformer_shapes(csv_file: Path, select: str, tokens: int) -> None:
    torch.manual_seed(0)
    encoder = IMUTransformerEncoder(IMUTransformerOptions(**TINY_TRANSFORMER, select_feature=select)).eval()
    x = encoder.preprocess(csv_file)
    out = encoder(torch.stack([x, x]))
    assert out.shape == (2, tokens, 32) and encoder.num_tokens(x) == tokens
    assert torch.allclose(out[0], out[1])


def test_imu_cnn_shapes_and_chunks(csv_file: Path) -> None:
    torch.manual_seed(0)
    encoder = IMUConvEncoder(IMUConvOptions(**TINY_CNN)).eval()
    x = encoder.preprocess(csv_file)
    assert encoder(x[None]).shape == (1, 50, 16) and encoder.num_tokens(x) == 50  # 400 / 2**3
    chunked = IMUConvEncoder(IMUConvOptions(**{**TINY_CNN, "window": 200}, chunk=True)).eval()
    xs = chunked.preprocess(csv_file)
    assert xs.shape == (2, 6, 200)
    assert chunked(torch.stack([xs, xs])).shape == (2, 50, 16) and chunked.num_tokens(xs) == 50


@pytest.mark.parametrize(("kind", "options"), [("imu_transformer", TINY_TRANSFORMER), ("imu_cnn", TINY_CNN)])
def test_weights_file_loads_and_freezes(
    tmp_path: Path, csv_file: Path, kind: str, options: dict[str, Any]
) -> None:
    torch.manual_seed(0)
    scratch = build_encoder("imu", EncoderConfig(type=kind, options=dict(options)))
    assert not scratch.is_pretrained and all(p.requires_grad for p in scratch.parameters())
    weights = tmp_path / f"{kind}.safetensors"
    save_file({k: v.contiguous() for k, v in scratch.state_dict().items()}, weights)
    loaded = build_encoder("imu", EncoderConfig(type=kind, options={**options, "weights": str(weights)}))
    assert loaded.is_pretrained and not any(p.requires_grad for p in loaded.parameters())
    x = scratch.preprocess(csv_file)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x[None]), scratch.eval()(x[None]))
    with pytest.raises(ValueError, match=rf"{weights} does not match"):
        build_encoder(
            "imu", EncoderConfig(type=kind, options={**options, "width": 64, "weights": str(weights)})
        )


# ---- bad input -----------------------------------------------------------------------------------------
def test_five_channels_raise(tmp_path: Path) -> None:
    times = np.arange(50) / 100.0
    csv_path = write_csv(tmp_path / "five.csv", times, signal(times)[:, :5], ["time", *COLUMNS[:5]])
    with pytest.raises(ValueError, match=rf"{csv_path}: expected 6 channels .* found 5"):
        load_imu(csv_path)
    np.save(tmp_path / "five.npy", signal(times)[:, :5])
    with pytest.raises(ValueError, match=r"five.npy: expected 6 channels .* found 5"):
        load_imu(tmp_path / "five.npy", input_rate=100.0)
    assert load_imu(tmp_path / "five.npy", channels=5, input_rate=100.0, sample_rate=100.0).shape == (5, 50)


def test_nan_too_short_and_missing_rate_raise(tmp_path: Path) -> None:
    times = np.arange(50) / 100.0
    values = signal(times)
    values[7, 4] = np.nan
    nan_path = write_csv(tmp_path / "nan.csv", times, values, ["time", *COLUMNS])
    with pytest.raises(ValueError, match=rf"{nan_path}: 1 NaN .* sample 7, column 'gyro_y'"):
        load_imu(nan_path)

    short = write_csv(tmp_path / "short.csv", times[:5], signal(times[:5]), ["time", *COLUMNS])
    with pytest.raises(ValueError, match=rf"{short}: too few samples: 9 at 200 Hz"):
        load_imu(short)
    one_row = write_csv(tmp_path / "one.csv", times[:1], signal(times[:1]), ["time", *COLUMNS])
    with pytest.raises(ValueError, match=rf"{one_row}: too few samples: 1"):
        load_imu(one_row)

    no_rate = write_csv(tmp_path / "norate.csv", None, signal(times), COLUMNS)
    with pytest.raises(ValueError, match=rf"{no_rate}: no sample rate.*input_rate"):
        load_imu(no_rate)
    np.save(tmp_path / "norate.npy", signal(times))
    with pytest.raises(ValueError, match=r"norate.npy: no sample rate"):
        load_imu(tmp_path / "norate.npy")


def test_malformed_files_raise(tmp_path: Path) -> None:
    times = np.arange(50) / 100.0
    backwards = write_csv(tmp_path / "back.csv", times[::-1], signal(times), ["time", *COLUMNS])
    with pytest.raises(ValueError, match=rf"{backwards}: timestamps .* must increase"):
        load_imu(backwards)
    seven = write_csv(tmp_path / "seven.csv", times, signal(times), None)  # timestamps without a header
    with pytest.raises(ValueError, match="found 7.*header named 'timestamp'"):
        load_imu(seven, input_rate=100.0)
    text = tmp_path / "text.csv"
    text.write_text("time,acc_x\n0.0,abc\n")
    with pytest.raises(ValueError, match=rf"{text}: line 2, acc_x: not a number"):
        load_imu(text)
    broken = tmp_path / "broken.npy"
    broken.write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(ValueError, match=rf"{broken}: cannot read it as NPY"):
        load_imu(broken, input_rate=100.0)
    other = tmp_path / "rec.json"
    other.write_text("{}")
    with pytest.raises(ValueError, match=rf"{other}: unsupported extension '.json'"):
        load_imu(other)
