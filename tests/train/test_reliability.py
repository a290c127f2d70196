"""Nothing a user trained is lost: a rejected run leaves the run's config alone, SIGTERM / SIGKILL mid-stage
resume bit-identically, checkpoints come every ``save_every_minutes``, a stage continues a full fine-tune's
LLM, a full bf16 fine-tune keeps a float32 master copy, and unreadable records are skipped and counted."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import mm_llama.train.loop as loop
from mm_llama.config import save_config
from mm_llama.errors import MMInputError
from mm_llama.train import StepInfo, build_stage_model, train
from mm_llama.train.checkpoint import OPTIMIZER_TENSORS_FILE, list_checkpoints
from mm_llama.train.config import TrainConfig
from mm_llama.train.loop import RUN_CONFIG_FILE
from mm_llama.train.report import HISTORY_FILE
from tests.train.conftest import align_stage, instruct_stage, tiny_train_config, write_colour_world

REPO = Path(__file__).resolve().parents[2]
STEPS = 6
KILL_TIMEOUT_S = 300


class SimulatedCrash(Exception):
    pass


def crash_at(step: int):
    def callback(info: StepInfo) -> None:
        if info.step == step:
            raise SimulatedCrash(f"stopped at step {step}")

    return callback


def saved_model(stage_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the stage's saved model files, keyed by file and name."""
    return {
        f"{f.relative_to(stage_dir)}:{k}": v
        for f in sorted(stage_dir.rglob("*.safetensors"))
        if "checkpoints" not in f.parts
        for k, v in load_file(str(f)).items()
    }


def assert_same_run(run: Path, reference: Path, stage: str = "align") -> None:
    history = json.loads((run / stage / HISTORY_FILE).read_text())
    reference_history = json.loads((reference / stage / HISTORY_FILE).read_text())
    assert history["loss"] == reference_history["loss"]
    got, want = saved_model(run / stage), saved_model(reference / stage)
    assert got.keys() == want.keys() and want
    for key in want:
        assert torch.equal(got[key], want[key]), key


# ---- 1. the run's config is written only once a stage is accepted ------------------------------------------
def test_a_rejected_resume_leaves_the_run_config_untouched(
    tmp_path: Path, colour_world: dict[str, Path]
) -> None:
    cfg = tiny_train_config(tmp_path / "run", {"align": align_stage(colour_world, max_steps=4)})
    with pytest.raises(SimulatedCrash):
        train(cfg, on_step=crash_at(2))
    written = (tmp_path / "run" / RUN_CONFIG_FILE).read_text()
    assert "0.01" in written
    changed = replace(cfg, stages={"align": replace(cfg.stages["align"], lr=1e-4)})
    with pytest.raises(ValueError, match="lr changed"):
        train(changed)
    assert (tmp_path / "run" / RUN_CONFIG_FILE).read_text() == written
    assert not list((tmp_path / "run").glob(".*.tmp"))


# ---- 2. preemption: SIGTERM, SIGKILL, checkpoints every N minutes -----------------------------------------
@pytest.fixture(scope="module")
def preemption(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The colour world and an uninterrupted reference run of a 6-step align stage."""
    root = tmp_path_factory.mktemp("preemption")
    world = write_colour_world(root / "world")
    cfg = tiny_train_config(root / "reference", {"align": align_stage(world, max_steps=STEPS)})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(cfg)
    finally:
        torch.set_num_threads(threads)
    return {"root": root, "config": cfg}


def kill_at(cfg: TrainConfig, tmp_path: Path, step: int, sig: signal.Signals) -> int:
    """Run ``cfg`` in a subprocess, send ``sig`` once step ``step`` is done; return its exit status."""
    config, marker = tmp_path / f"{sig.name}-{step}.yaml", tmp_path / f"{sig.name}-{step}.marker"
    save_config(cfg, config)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "tests.train.preempted_run", str(config), str(step), str(marker)]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + KILL_TIMEOUT_S
        while not marker.exists():
            if process.poll() is not None:
                raise AssertionError(process.stdout.read().decode()[-3000:])
            assert time.monotonic() < deadline, "the training subprocess never reached its step"
            time.sleep(0.2)
        process.send_signal(sig)
        output = process.communicate(timeout=KILL_TIMEOUT_S)[0].decode()
    finally:
        if process.poll() is None:
            process.kill()
    if sig == signal.SIGTERM:
        assert f"interrupted after step {step}: writing a checkpoint first" in output, output[-3000:]
        assert "TrainingTerminated" in output
    return process.returncode


@pytest.mark.parametrize("seed", [1, 2])
def test_sigterm_mid_stage_checkpoints_and_resumes_bit_identically(
    preemption: dict[str, Any], tmp_path: Path, seed: int
) -> None:
    step = random.Random(seed).randint(1, STEPS - 1)
    cfg = replace(preemption["config"], output_dir=str(tmp_path / "run"))  # save_every: 0, the default
    assert cfg.stages["align"].save_every == 0
    status = kill_at(cfg, tmp_path, step, signal.SIGTERM)
    assert status != 0
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "align")] == [f"step-{step:06d}"]
    steps: list[int] = []
    train(cfg, on_step=lambda info: steps.append(info.step))
    assert steps == list(range(step + 1, STEPS + 1))
    assert_same_run(tmp_path / "run", Path(preemption["config"].output_dir))


def test_sigkill_resumes_from_the_periodic_checkpoints_bit_identically(
    preemption: dict[str, Any], tmp_path: Path
) -> None:
    step = random.Random(3).randint(2, STEPS - 1)
    cfg = preemption["config"]
    cfg = replace(
        cfg, output_dir=str(tmp_path / "run"), stages={"align": replace(cfg.stages["align"], save_every=1)}
    )
    assert kill_at(cfg, tmp_path, step, signal.SIGKILL) == -signal.SIGKILL
    assert list_checkpoints(tmp_path / "run" / "align")[-1].name == f"step-{step:06d}"
    steps: list[int] = []
    train(cfg, on_step=lambda info: steps.append(info.step))
    assert steps == list(range(step + 1, STEPS + 1))
    assert_same_run(tmp_path / "run", Path(preemption["config"].output_dir))


def test_sigterm_handler_is_restored_after_the_stage(tmp_path: Path, colour_world: dict[str, Path]) -> None:
    before = signal.getsignal(signal.SIGTERM)
    seen: list[Any] = []
    cfg = tiny_train_config(tmp_path / "run", {"align": align_stage(colour_world, max_steps=1)})
    train(cfg, on_step=lambda info: seen.append(signal.getsignal(signal.SIGTERM)))
    assert seen and seen[0] is not before
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize("minutes", [30.0, 0.0])
def test_save_every_minutes_writes_checkpoints(
    tmp_path: Path, colour_world: dict[str, Path], monkeypatch: pytest.MonkeyPatch, minutes: float
) -> None:
    now = [0.0]

    def clock() -> float:  # each reading is 11 minutes after the last
        now[0] += 11 * 60
        return now[0]

    monkeypatch.setattr(loop, "_clock", clock)
    stage = align_stage(colour_world, max_steps=5, save_every_minutes=minutes, keep_checkpoints=5)
    cfg = tiny_train_config(tmp_path / "run", {"align": stage})
    seen: dict[int, list[str]] = {}
    train(
        cfg,
        on_step=lambda info: seen.__setitem__(
            info.step, [p.name for p in list_checkpoints(tmp_path / "run" / "align")]
        ),
    )
    if minutes:  # clock: 11 at the start, 22 / 33 / 44 after steps 1-3: 33 minutes -> checkpoint at 3
        assert seen[2] == [] and seen[3] == ["step-000003"] and seen[5] == ["step-000003"]
    else:
        assert seen[5] == []


# ---- 3. a stage continues a full fine-tune's LLM -------------------------------------------------------
def test_init_from_a_full_fine_tune_starts_from_its_llm(
    tmp_path: Path, colour_world: dict[str, Path]
) -> None:
    stages = {
        "full": instruct_stage(colour_world, llm="full", max_steps=2, lr=1e-2),
        "next": instruct_stage(colour_world, llm="frozen", init_from="full", max_steps=1),
    }
    cfg = tiny_train_config(tmp_path / "run", stages)
    base = {k: v.clone() for k, v in build_stage_model(cfg, "full").llm.state_dict().items()}
    seen: dict[str, dict[str, torch.Tensor]] = {}

    def keep(info: StepInfo) -> None:
        seen[info.stage] = {k: v.detach().clone() for k, v in info.model.llm.state_dict().items()}

    train(cfg, on_step=keep)
    saved = load_file(str(tmp_path / "run" / "full" / "llm" / "model.safetensors"))
    next_llm = seen["next"]
    assert saved.keys() <= next_llm.keys()
    for key, value in saved.items():
        assert torch.equal(next_llm[key], value), key
    assert any(not torch.equal(next_llm[k], base[k]) for k in saved), "stage 2 went back to the base LLM"


# ---- 4. full fine-tuning in bf16 keeps a float32 master copy ---------------------------------------------
def test_full_bf16_fine_tune_keeps_float32_master_weights(
    tmp_path: Path, colour_world: dict[str, Path]
) -> None:
    stage = instruct_stage(
        colour_world,
        llm="full",
        lr=1e-6,
        max_steps=2,
        lr_schedule="constant",
        save_every=1,
        max_grad_norm=0.0,
    )
    cfg = tiny_train_config(tmp_path / "run", {"full": stage})
    cfg = replace(cfg, model=replace(cfg.model, llm=replace(cfg.model.llm, dtype="bfloat16")))
    before = {k: v.detach().clone() for k, v in build_stage_model(cfg, "full").llm.named_parameters()}
    assert all(v.dtype == torch.float32 for v in before.values())
    after: dict[str, torch.Tensor] = {}
    train(
        cfg,
        on_step=lambda info: after.update(
            {k: v.detach().clone() for k, v in info.model.llm.named_parameters()}
        ),
    )
    assert all(v.dtype == torch.float32 for v in after.values())
    moments = load_file(str(list_checkpoints(tmp_path / "run" / "full")[-1] / OPTIMIZER_TENSORS_FILE))
    assert moments and all(v.dtype == torch.float32 for v in moments.values())
    weight = "model.layers.0.mlp.down_proj.weight"
    delta = (after[weight] - before[weight]).abs().max()
    assert 0 < delta < 1e-4  # an update of about 2 lr: bf16 (8 bits of mantissa) would round it away
    assert not torch.equal(after[weight].bfloat16().float(), after[weight])
    saved = load_file(str(tmp_path / "run" / "full" / "llm" / "model.safetensors"))
    assert {v.dtype for v in saved.values()} == {torch.bfloat16}


# ---- 5. unreadable training records -------------------------------------------------------------------
def broken_world(root: Path) -> dict[str, Path]:
    """The colour world with a corrupt image (q1), a missing image (q2) and a marker count mismatch (q3)."""
    world = write_colour_world(root)
    (root / "images" / "1.png").write_bytes(b"not a png")
    records = json.loads(world["instruct"].read_text())
    records[2]["image"] = "images/missing.png"
    records[3]["conversations"][0]["value"] = "<image>\n<image>\nWhat colour is it?"
    world["instruct"].write_text(json.dumps(records))
    return world


def test_on_error_skip_skips_counts_and_reports(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    world = broken_world(tmp_path / "world")
    stage = instruct_stage(
        world, llm="frozen", on_error="skip", max_steps=2, batch_size=1, micro_batch_size=1
    )
    cfg = tiny_train_config(tmp_path / "run", {"instruct": stage})
    with caplog.at_level("WARNING"):
        out = train(cfg)
    skipped = json.loads((out / HISTORY_FILE).read_text())["skipped"]
    assert skipped.get("missing_file") == 1
    assert sum(skipped.values()) >= 1  # the missing file, plus any bad record the 2 steps read
    assert "instruct.json:q2" in caplog.text and "skipped training records" in caplog.text
    # every step of an epoch: all 7 readable records are read, the 2 bad ones skipped and named
    cfg = replace(
        cfg, output_dir=str(tmp_path / "epoch"), stages={"instruct": replace(stage, max_steps=None, epochs=1)}
    )
    caplog.clear()
    with caplog.at_level("WARNING"):
        out = train(cfg)
    skipped = json.loads((out / HISTORY_FILE).read_text())["skipped"]
    assert skipped == {"missing_file": 1, "bad_input": 1, "invalid_record": 1}
    for rid in ("q1", "q2", "q3"):
        assert f"instruct.json:{rid}" in caplog.text


def test_on_error_raise_names_the_record(tmp_path: Path) -> None:
    world = broken_world(tmp_path / "world")
    records = json.loads(world["instruct"].read_text())
    records[2]["image"] = "images/2.png"
    records[3]["conversations"][0]["value"] = "<image>\nWhat colour is it?"
    world["instruct"].write_text(json.dumps(records))  # only the corrupt image is left
    stage = instruct_stage(world, llm="frozen", max_steps=4, batch_size=8, micro_batch_size=8)
    cfg = tiny_train_config(tmp_path / "run", {"instruct": stage})
    with pytest.raises(MMInputError, match=r"instruct\.json:q1"):
        train(cfg)
