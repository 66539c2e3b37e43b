"""``python -m boost_lightning.data.tokenizer``: a chat tokenizer trained on the message contents of files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import Dataset
from transformers import AutoTokenizer

from boost_lightning.data.sources import load_split
from boost_lightning.data.tokenizer import load_tokenizer, main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def files(make_row, write_jsonl, tmp_path):
    real = write_jsonl("real.jsonl", [make_row(i, source="real") for i in range(5)])
    synthetic = tmp_path / "synthetic.parquet"
    Dataset.from_list([make_row(100 + i, turns=3) for i in range(5)]).to_parquet(str(synthetic))
    return real, str(synthetic)


def test_cli_trains_a_chat_tokenizer_that_loads_and_tokenizes_the_data(files, tmp_path, make_row, capsys):
    out = tmp_path / "tok"
    assert main(["--from", *files, "--out", str(out), "--vocab-size", "300"]) == 0
    assert "from 10 trajectories" in capsys.readouterr().out

    tokenizer = load_tokenizer(str(out))
    assert tokenizer is not None and len(tokenizer) <= 300
    assert AutoTokenizer.from_pretrained(str(out)).eos_token == "<|im_end|>"
    text = "You are at (3, 1). Walls: north."
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    rendered = tokenizer.apply_chat_template(make_row(0)["messages"], tokenize=False)
    assert rendered.startswith("<|im_start|>system\nYou are in a maze.<|im_end|>")
    # Learned merges from the corpus: a word of the data is fewer tokens than bytes.
    assert len(tokenizer("Walls: north.")["input_ids"]) < len("Walls: north.")
    # The data layer takes it as it is: agent-turn masks come from its chat template.
    split = load_split(files[0], "real", tokenizer, max_length=256, cache_dir=str(tmp_path / "cache"))
    assert split.num_rows == 5 and all(n > 0 for n in split.dataset["num_agent_tokens"])


def test_cli_reports_a_bad_row_with_its_file_and_line_and_a_too_small_vocabulary(write_jsonl, make_row, tmp_path,
                                                                                 capsys):
    bad = write_jsonl("bad.jsonl", [make_row(0), {"messages": [{"role": "user", "content": "hi"}], "reward": 1.0}])
    with pytest.raises(SystemExit) as exit_info:
        main(["--from", bad, "--out", str(tmp_path / "tok")])
    assert exit_info.value.code == 2
    assert "bad.jsonl:2: field 'messages': no assistant turn" in capsys.readouterr().err
    assert not (tmp_path / "tok").exists()
    with pytest.raises(SystemExit):
        main(["--from", bad, "--out", str(tmp_path / "tok"), "--vocab-size", "100"])
    assert "--vocab-size must be at least 260" in capsys.readouterr().err


def test_module_runs_as_a_command(files, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "boost_lightning.data.tokenizer", "--from", *files, "--out",
                           str(tmp_path / "tok")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert load_tokenizer(str(tmp_path / "tok")).chat_template is not None
