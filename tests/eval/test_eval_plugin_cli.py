"""``mm-llama eval --plugin examples/new_modality.py --task llava_qa``: a plugin modality (depth maps)
evaluated from the command line, on a tiny random depth model.

Both steps run in subprocesses, so that the example's ``depth`` modality and ``depth_cnn`` encoder do not
leak into this process's registries. The model is untrained, so the test makes its own references: the
setup asks the saved model the questions (one batch, as the runner does), and the data file then gives
every other record that very answer as its reference and the others an answer it did not give. The
eval must score exactly those records as hits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from mm_llama.eval.metrics import evalai_normalize

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "new_modality.py"
TIMEOUT_S = 300
MAX_NEW_TOKENS = 4
WRONG = "a zebra crossing"

SETUP = """
import json, sys
from pathlib import Path

import torch

from mm_llama.model import MultimodalLM
from mm_llama.plugins import import_plugins

import_plugins([sys.argv[1]])
example = sys.modules["mm_llama_plugin_new_modality"]
out, max_new_tokens = Path(sys.argv[2]), int(sys.argv[3])
files = example.write_depth_world(out / "data", n_train=0, n_eval=2, seed=0)
llm = example.tiny_llm(out / "tiny_llm")
config = example.depth_train_config(llm, files["eval"], out / "run", steps=1, lr=1e-2).model
torch.manual_seed(0)
MultimodalLM(config).save_pretrained(out / "ckpt")
model = MultimodalLM.from_pretrained(out / "ckpt").eval()
records = json.loads(files["eval"].read_text())
answers = model.generate(
    [r["conversations"][0]["value"] for r in records],
    media={"depth": [[str(files["eval"].parent / r["depth"])] for r in records]},
    max_new_tokens=max_new_tokens,
)
print(json.dumps({"data": str(files["eval"]), "answers": dict(zip([r["id"] for r in records], answers))}))
"""


def run_python(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same threads in both processes: the same answers
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
    )


def test_eval_a_plugin_modality_from_the_command_line(tmp_path: Path) -> None:
    setup = run_python("-c", SETUP, str(EXAMPLE), str(tmp_path), str(MAX_NEW_TOKENS))
    assert setup.returncode == 0, setup.stderr[-4000:]
    made = json.loads(setup.stdout.strip().splitlines()[-1])
    answers: dict[str, str] = made["answers"]
    records = json.loads(Path(made["data"]).read_text())
    assert len(records) == 6 and all("depth" in r for r in records)

    hits = set()
    for i, record in enumerate(records):
        said = answers[record["id"]]
        assert evalai_normalize(said) != evalai_normalize(WRONG)
        reference = said if i % 2 == 0 else WRONG
        if i % 2 == 0:
            hits.add(record["id"])
        record["conversations"][1]["value"] = reference
    data = Path(made["data"]).with_name("qa.json")  # beside the maps/ the records name
    data.write_text(json.dumps(records))

    out = tmp_path / "eval"
    result = run_python(
        "-m",
        "mm_llama.cli",
        "eval",
        "--plugin",
        str(EXAMPLE),
        "--checkpoint",
        str(tmp_path / "ckpt"),
        "--task",
        "llava_qa",
        "--data",
        str(data),
        "--max-new-tokens",
        str(MAX_NEW_TOKENS),
        "--output",
        str(out),
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "llava_qa: 6 questions" in result.stdout

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "llava_qa" and metrics["num_questions"] == 6 and metrics["scored"] == 6
    assert metrics["accuracy"] == 50.0 and metrics["per_modality"] == {"depth": 50.0}
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [line["question_id"] for line in lines] == [r["id"] for r in records]
    assert all(line["prompt"].startswith("<depth>\n") for line in lines)
    assert {line["question_id"]: line["prediction"] for line in lines} == answers
    scored = {
        line["question_id"]
        for line in lines
        if evalai_normalize(line["prediction"]) == evalai_normalize(line["answers"][0])
    }
    assert scored == hits
