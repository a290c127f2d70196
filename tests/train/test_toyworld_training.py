"""The toy world's four modalities (image, audio, video, IMU) train through both stages with tiny
encoders: mixed-modality batches, every projector learns."""

from __future__ import annotations

from pathlib import Path

import torch

from mm_llama.config import EncoderConfig, ModalityConfig, ModelConfig, ProjectorConfig
from mm_llama.data.toyworld import generate_toyworld
from mm_llama.train import StepInfo, TrainConfig, build_stage_model, train
from mm_llama.train.config import LoraSettings, StageConfig
from tests.conftest import TINY_CLIP, tiny_llm_config

PER_MODALITY = 4
BATCH = 8  # 2 steps of 8 cover the 16 records of a split: every modality is seen
TINY_ENCODERS: dict[str, EncoderConfig] = {
    "image": EncoderConfig("hf_vision", {"config": dict(TINY_CLIP)}),
    "audio": EncoderConfig(
        "audio_transformer", {"max_seconds": 1.0, "width": 32, "depth": 1, "heads": 2, "stem_channels": 4}
    ),
    "video": EncoderConfig(
        "video",
        {
            "frame_encoder": {"type": "hf_vision", "options": {"config": dict(TINY_CLIP)}},
            "num_frames": 4,
            "aggregation": "mean",
        },
    ),
    "imu": EncoderConfig(
        "imu_transformer",
        {"window": 64, "patch_size": 8, "width": 32, "depth": 1, "heads": 2, "min_samples": 8},
    ),
}


def test_four_modalities_train_through_both_stages(tmp_path: Path) -> None:
    world = tmp_path / "world"
    generate_toyworld(world, n_train=PER_MODALITY, n_val=1, n_test=1)
    model = ModelConfig(
        llm=tiny_llm_config(),
        modalities={
            m: ModalityConfig(enc, ProjectorConfig("mlp2x_gelu")) for m, enc in TINY_ENCODERS.items()
        },
        system_prompt="Be brief.",
    )
    common = {
        "batch_size": BATCH,
        "micro_batch_size": BATCH // 2,
        "max_steps": 2,
        "lr": 1e-3,
        "warmup_ratio": 0.0,
    }
    stages = {
        "align": StageConfig(data=[str(world / "align_train.json")], template="plain", **common),
        "instruct": StageConfig(
            data=[str(world / "instruct_train.json")],
            template="chat",
            llm="qlora",
            lora=LoraSettings(r=4, alpha=8),
            init_from="align",
            train_encoders="none",
            **common,
        ),
    }
    cfg = TrainConfig(model=model, stages=stages, output_dir=str(tmp_path / "run"))
    initial = {k: v.clone() for k, v in build_stage_model(cfg, "align").projectors.state_dict().items()}
    last: dict[str, dict[str, torch.Tensor]] = {}

    def keep_projectors(info: StepInfo) -> None:
        last[info.stage] = {k: v.detach().clone() for k, v in info.model.projectors.state_dict().items()}

    out = train(cfg, on_step=keep_projectors)
    assert (out / "adapter").is_dir()
    for stage, before in (("align", initial), ("instruct", last["align"])):
        for modality in TINY_ENCODERS:
            weight = f"{modality}.linear_2.weight"
            assert not torch.equal(before[weight], last[stage][weight]), (stage, modality)
