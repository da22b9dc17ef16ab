import argparse
import subprocess
import sys

import pytest
import yaml

from config import (RAFT_SCHEMA, apply_overrides, generation_settings, load_config, load_config_with_flags,
                    load_eval_config)
from errors import ConfigError
from tests.conftest import ROOT, write_run


def write_config(tmp_path, **changes):
    cfg = yaml.safe_load((ROOT / "raft.yaml").read_text())
    cfg.update(changes)
    path = tmp_path / "raft.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_shipped_config_is_valid():
    cfg = load_config(str(ROOT / "raft.yaml"), RAFT_SCHEMA)
    assert cfg["chunk_size"] == 1000 and cfg["num_distract_docs"] == 4
    assert cfg["oracle_probability"] == 0.8 and cfg["refusal_probability"] == 0.05
    assert cfg["questions_per_chunk"] == 4 and cfg["quality"]["answer_checks"] is True


def test_every_key_is_documented_by_a_comment():
    lines = (ROOT / "raft.yaml").read_text().splitlines()
    for key in RAFT_SCHEMA:
        index = next(i for i, line in enumerate(lines) if line.startswith(f"{key}:"))
        assert lines[index - 1].startswith("#"), f"{key} has no comment above it"


@pytest.mark.parametrize("changes, message", [
    ({"oracle_probabilty": 0.5}, "unknown key 'oracle_probabilty' (did you mean 'oracle_probability'?)"),
    ({"chunk_size": "big"}, "key 'chunk_size' must be an integer"),
    ({"questions_per_chunk": True}, "key 'questions_per_chunk' must be an integer"),
    ({"oracle_probability": 1.5}, "key 'oracle_probability' must be between 0 and 1, got 1.5"),
    ({"refusal_probability": -0.1}, "key 'refusal_probability' must be between 0 and 1"),
    ({"num_distract_docs": -1}, "key 'num_distract_docs' must be 0 or more, got -1"),
    ({"quality": {"answer_checks": True}}, "section 'quality' misses question_checks"),
    ({"question_prompt": [{"role": "user", "content": "no placeholders"}]},
     "key 'question_prompt' must contain the placeholder(s) {context}, {num_questions}"),
    ({"answer_prompt": [{"role": "robot", "content": "{context} {question}"}]}, "roles must be system, user or assistant"),
])
def test_bad_values_name_the_key(tmp_path, changes, message):
    with pytest.raises(ConfigError) as error:
        load_config(write_config(tmp_path, **changes), RAFT_SCHEMA)
    assert message in str(error.value)


def test_missing_key_and_missing_file(tmp_path):
    cfg = yaml.safe_load((ROOT / "raft.yaml").read_text())
    del cfg["seed"]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="missing key\\(s\\) seed"):
        load_config(str(tmp_path / "c.yaml"), RAFT_SCHEMA)
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "absent.yaml"), RAFT_SCHEMA)
    (tmp_path / "bad.yaml").write_text("chunk_size: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(str(tmp_path / "bad.yaml"), RAFT_SCHEMA)


def test_flags_override_and_are_validated():
    cfg = load_config(str(ROOT / "raft.yaml"), RAFT_SCHEMA)
    merged = apply_overrides(cfg, {"chunk_size": 500, "seed": None}, RAFT_SCHEMA)
    assert merged["chunk_size"] == 500 and merged["seed"] == cfg["seed"]
    with pytest.raises(ConfigError, match="command line: key 'questions_per_chunk' must be greater than 0"):
        apply_overrides(cfg, {"questions_per_chunk": 0}, RAFT_SCHEMA)


def test_cli_reports_a_config_mistake_in_one_line(tmp_path):
    path = write_config(tmp_path, oracle_probability=2)
    run = subprocess.run([sys.executable, str(ROOT / "raft.py"), "-c", path], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [f"error: {path}: key 'oracle_probability' must be between 0 and 1, got 2.0"]


def test_flags_named_like_keys_win_over_the_file():
    flags = argparse.Namespace(config="x", chunk_size=500, seed=None, unrelated="kept out")
    cfg = load_config_with_flags(str(ROOT / "raft.yaml"), RAFT_SCHEMA, flags)
    assert cfg["chunk_size"] == 500 and cfg["seed"] == load_config(str(ROOT / "raft.yaml"), RAFT_SCHEMA)["seed"]
    assert "unrelated" not in cfg


# ---- the generation run's settings, read back by the evaluation and the chatbot --------------------------------
def test_generation_settings_come_from_the_run_record(tmp_path):
    run = write_run(tmp_path / "out", chunk_size=500, data_dir="docs/", refusal_answer="Ask a person.")
    for given in (str(run), str(run / "raft_run.json")):
        settings, origin = generation_settings(given, str(ROOT / "raft.yaml"))
        assert settings == {"data_dir": "docs/", "xml_path": "", "verify_ssl": True, "chunk_size": 500,
                            "refusal_answer": "Ask a person."}
        assert origin == str(run / "raft_run.json")


def test_without_a_run_the_generation_config_is_used_and_a_named_run_must_exist(tmp_path):
    settings, origin = generation_settings("", str(ROOT / "raft.yaml"))
    assert settings["chunk_size"] == 1000 and origin == str(ROOT / "raft.yaml")
    with pytest.raises(ConfigError, match="no raft_run.json there"):
        generation_settings(str(tmp_path / "none"), str(ROOT / "raft.yaml"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "raft_run.json").write_text('{"config": {"chunk_size": "big"}}')
    with pytest.raises(ConfigError, match="bad/raft_run.json"):
        generation_settings(str(tmp_path / "bad"), str(ROOT / "raft.yaml"))


def test_the_eval_config_takes_the_run_and_its_flags_override_single_settings(tmp_path):
    run = write_run(tmp_path / "out", chunk_size=500, data_dir="docs/")
    flags = argparse.Namespace(raft_run=str(run), chunk_size=None, data_dir=None, xml_path=None, verify_ssl=None)
    cfg = load_eval_config(str(ROOT / "raft_eval_config.yaml"), flags)
    assert (cfg["chunk_size"], cfg["data_dir"], cfg["sources_from"]) == (500, "docs/", str(run / "raft_run.json"))
    flags.chunk_size, flags.data_dir = 700, "elsewhere/"
    cfg = load_eval_config(str(ROOT / "raft_eval_config.yaml"), flags)
    assert (cfg["chunk_size"], cfg["data_dir"]) == (700, "elsewhere/")
    flags.chunk_size = 0
    with pytest.raises(ConfigError, match="chunk_size"):
        load_eval_config(str(ROOT / "raft_eval_config.yaml"), flags)
