"""Nothing is downloaded unless the user opts in: names that are not local fail at once, named."""

from __future__ import annotations

import pytest

from mm_llama.config import LLMConfig
from mm_llama.errors import MMInputError
from mm_llama.hub import HUB_ENV
from mm_llama.llm import load_llm, load_tokenizer


@pytest.fixture(autouse=True)
def hub_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(HUB_ENV, raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # the refusal must not rely on it


def test_a_hub_id_not_in_the_cache_is_refused_without_a_download() -> None:
    with pytest.raises(MMInputError, match=rf"'nobody-here/no-such-llm' is not a local folder.*{HUB_ENV}=1"):
        load_llm(LLMConfig(name_or_path="nobody-here/no-such-llm"))
    with pytest.raises(MMInputError, match=r"llm\.name_or_path \(tokenizer\)"):
        load_tokenizer(LLMConfig(name_or_path="nobody-here/no-such-llm"))


def test_a_missing_local_folder_is_reported_as_a_folder(tmp_path) -> None:
    missing = tmp_path / "runs" / "stage" / "llm"
    with pytest.raises(MMInputError, match=f"llm.name_or_path: folder not found: {missing}"):
        load_llm(LLMConfig(name_or_path=str(missing)))


@pytest.mark.parametrize(
    ("encoder", "what"),
    [("hf_vision", "hf_vision encoder"), ("whisper", "whisper encoder"), ("clap", "clap encoder")],
)
def test_encoders_refuse_uncached_hub_ids_too(encoder: str, what: str) -> None:
    from mm_llama.config import EncoderConfig
    from mm_llama.encoders.base import build_encoder

    with pytest.raises(MMInputError, match=f"{what}: 'nobody-here/no-such-tower' is not a local folder"):
        build_encoder("x", EncoderConfig(type=encoder, options={"name_or_path": "nobody-here/no-such-tower"}))
