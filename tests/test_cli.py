"""The `clover2` command's user errors: one line naming the argument, exit code 2, no traceback.

None of these tests loads a model: the arguments are checked before anything is loaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from clover2_hf.tools import cli
from clover2_hf.tools.cli import main

COMMANDS = ("train", "self-distill", "evaluate", "features", "bench", "tune", "demo")
REQUIRED = {  # the minimal arguments each subcommand needs to get past argparse
    "train": ["--output-dir", "OUT"],
    "self-distill": ["--output", "OUT/answers.jsonl"],
    "evaluate": ["--draft", "DRAFTER"],
    "features": ["--output-dir", "OUT"],
    "bench": [],
    "tune": [],
    "demo": [],
}


@pytest.fixture
def drafter_dir(tmp_path):
    path = tmp_path / "drafter"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "clover2"}))
    return path


def _argv(command, extra, tmp_path, drafter_dir):
    base = [str(drafter_dir) if a == "DRAFTER" else a.replace("OUT", str(tmp_path / "out"))
            for a in REQUIRED[command]]
    return [command, *base, *extra]


def _one_line_error(capsys, argv, *names):
    """Run `main(argv)`: exit code 2, a single stderr line `clover2 <cmd>: ...` naming every name."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"clover2 {argv[0]}: "), err
    assert "Traceback" not in err
    for name in names:
        assert name in lines[0], err
    return lines[0]


def _argparse_error(capsys, argv, *names):
    """Run `main(argv)`: argparse's usage + one error line naming every name, exit code 2."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"clover2 {argv[0]}: error: argument "), err
    for name in names:
        assert name in last, err
    return last


# --------------------------------------------------------------------------- missing paths


@pytest.mark.parametrize("command,option", [
    ("bench", "--draft"), ("demo", "--draft"), ("tune", "--draft"), ("evaluate", "--draft"),
    ("train", "--init-from"), ("train", "--data"), ("train", "--features"), ("features", "--data"),
    ("self-distill", "--data"), ("evaluate", "--data"), ("bench", "--questions"), ("tune", "--questions"),
    *[(command, "--target") for command in COMMANDS],
])
def test_missing_path_is_one_line(capsys, tmp_path, drafter_dir, command, option):
    missing = "/nonexistent/dir"
    argv = _argv(command, [option, missing], tmp_path, drafter_dir)
    line = _one_line_error(capsys, argv, option, missing)
    assert line.endswith("no such file or directory")


def test_relative_missing_path_is_local(capsys, tmp_path, drafter_dir):
    line = _one_line_error(capsys, ["bench", "--draft", "./no/such/drafter"], "--draft")
    assert line == "clover2 bench: --draft ./no/such/drafter: no such file or directory"


def test_directory_without_config_is_not_a_drafter(capsys, tmp_path):
    line = _one_line_error(capsys, ["evaluate", "--draft", str(tmp_path)], "--draft", str(tmp_path))
    assert "not a Clover-2 drafter directory (no config.json)" in line
    _one_line_error(capsys, ["bench", "--draft", str(tmp_path)], "--draft", "no config.json")
    _one_line_error(capsys, ["demo", "--draft", str(tmp_path)], "--draft", "no config.json")
    _one_line_error(capsys, ["train", "--output-dir", str(tmp_path / "o"), "--init-from", str(tmp_path)],
                    "--init-from", "no config.json")
    _one_line_error(capsys, ["bench", "--target", str(tmp_path)], "--target", "no config.json")


def test_other_model_type_is_not_a_drafter(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    line = _one_line_error(capsys, ["tune", "--draft", str(tmp_path)], "--draft")
    assert "model_type is 'llama', expected 'clover2'" in line


def test_drafter_passed_as_target(capsys, tmp_path, drafter_dir):
    _one_line_error(capsys, ["self-distill", "--output", str(tmp_path / "a.jsonl"), "--target", str(drafter_dir)],
                    "--target", "is a Clover-2 drafter")


def test_question_file_that_is_a_directory(capsys, tmp_path):
    _one_line_error(capsys, ["bench", "--questions", str(tmp_path)], "--questions", "is a directory")


def test_invalid_hub_id_is_one_line(capsys, tmp_path):
    line = _one_line_error(capsys, ["train", "--output-dir", str(tmp_path), "--target", "bad!!id"], "--target bad!!id")
    assert "not a local directory and not reachable on the Hub" in line


UNREACHABLE = (["bench", "--target", "no-such-org/no-such-model"], ["demo", "--draft", "no-such-org/no-such-model"])


def _assert_cannot_load(argv, code, err):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"clover2 {argv[0]}: {argv[1]} no-such-org/no-such-model: cannot load"), lines[0]


def test_unreachable_hub_id_is_one_line(capsys, monkeypatch):
    """A well-formed repo id that cannot be fetched: one line, no traceback (in process; the real entry point's
    whole stderr is checked by the slow test below)."""
    import huggingface_hub.constants

    # read at each call by huggingface_hub.constants.is_offline_mode(), which transformers' file lookup asks
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for argv in UNREACHABLE:
        with pytest.raises(SystemExit) as info:
            main(argv)
        _assert_cannot_load(argv, info.value.code, capsys.readouterr().err)


@pytest.mark.slow  # two fresh interpreters (~6 s each)
def test_unreachable_hub_id_is_one_line_from_the_command(tmp_path):
    """The same through `python -m clover2_hf.tools.cli`: everything the process writes to stderr (log handlers,
    warnings, import-time messages) is one line."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for argv in UNREACHABLE:
        proc = subprocess.run([sys.executable, "-m", "clover2_hf.tools.cli", *argv], capture_output=True, text=True,
                              env=env, cwd=tmp_path, timeout=120)
        _assert_cannot_load(argv, proc.returncode, proc.stderr)


# --------------------------------------------------------------------------- bad numbers


@pytest.mark.parametrize("argv,option", [
    (["tune", "--budgets", "a,b"], "--budgets"),
    (["tune", "--top-ks", "0"], "--top-ks"),
    (["tune", "--repeats", "0"], "--repeats"),
    (["tune", "--num-prompts", "0"], "--num-prompts"),
    (["demo", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["bench", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["bench", "--num-questions", "-1"], "--num-questions"),
    (["bench", "--per-category", "0"], "--per-category"),
    (["bench", "--repeats", "0"], "--repeats"),
    (["bench", "--max-new-tokens", "many"], "--max-new-tokens"),
    (["bench", "--tree-budget", "0"], "--tree-budget"),
    (["bench", "--tree-top-k", "two"], "--tree-top-k"),
    (["bench", "--tree-lookup-tokens", "-1"], "--tree-lookup-tokens"),
    (["self-distill", "--output", "a.jsonl", "--batch-size", "0"], "--batch-size"),
    (["train", "--output-dir", "o", "--batch-size", "0"], "--batch-size"),
    (["train", "--output-dir", "o", "--max-steps", "0"], "--max-steps"),
    (["train", "--output-dir", "o", "--learning-rate", "-1"], "--learning-rate"),
    (["features", "--output-dir", "o", "--eval-fraction", "1.5"], "--eval-fraction"),
    (["evaluate", "--draft", "d", "--max-length", "0"], "--max-length"),
])
def test_bad_number_is_rejected(capsys, argv, option):
    last = _argparse_error(capsys, argv, option)
    assert "expected" in last


def test_budgets_message(capsys):
    last = _argparse_error(capsys, ["tune", "--budgets", "a,b"], "--budgets")
    assert last.endswith("--budgets: expected comma-separated integers >= 1, got 'a,b'")


def test_int_list_helper():
    assert cli._int_list(None, [1]) == [1]
    assert cli._int_list("4, 8,", None) == [4, 8]
    assert cli._int_list([2, 3], None) == [2, 3]
    with pytest.raises(cli.UsageError):
        cli._int_list("0", None)


# --------------------------------------------------------------------------- bench methods / subset


def test_unknown_method_exits_2(capsys):
    _one_line_error(capsys, ["bench", "--methods", "clover2-tree,eagle"], "--methods", "eagle")


def test_assisted_without_assistant_exits_2(capsys):
    _one_line_error(capsys, ["bench", "--methods", "assisted"], "--assistant")


def test_all_conflicts_with_subsets(capsys):
    _one_line_error(capsys, ["bench", "--all", "--per-category", "2"], "--all")


def test_compile_and_tree_options_need_methods_they_apply_to(capsys):
    _one_line_error(capsys, ["bench", "--compile", "--methods", "clover2-tree"], "--compile", "static methods")
    _one_line_error(capsys, ["bench", "--tree-budget", "3", "--methods", "prompt-lookup,plain-static"], "--tree-budget",
                    "clover2-*")


class _Stop(Exception):
    pass


@pytest.mark.parametrize("extra,count,hint", [
    ([], 8, True), (["--all"], 80, False), (["--per-category", "2"], 16, False), (["--num-questions", "3"], 3, False),
])
def test_bench_default_is_a_small_subset(monkeypatch, capsys, extra, count, hint):
    import torch

    import clover2_hf.tools.bench as bench

    class Target:
        dtype, device = torch.float32, torch.device("cpu")

    seen = {}

    def fake_run(target, tokenizer, draft, questions, methods, **kwargs):
        seen["n"] = len(questions)
        raise _Stop

    monkeypatch.setattr(cli, "_load_models", lambda args, draft_required: (Target(), None, None, False))
    monkeypatch.setattr(bench, "run_benchmark", fake_run)
    with pytest.raises(_Stop):
        main(["bench", *extra])
    assert seen["n"] == count
    err = capsys.readouterr().err
    assert f"running {count} of 80 MT-Bench questions" in err
    assert ("--all for every question" in err) is hint


# --------------------------------------------------------------------------- the guard


def test_genuine_bugs_keep_their_traceback(monkeypatch, capsys):
    def broken(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "_demo", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["demo"])


def test_system_exit_message_becomes_exit_code_2(monkeypatch, capsys):
    def refuse(args):
        raise SystemExit("clover2 tune: nothing to tune")

    monkeypatch.setattr(cli, "_tune", refuse)
    with pytest.raises(SystemExit) as info:
        main(["tune"])
    assert info.value.code == 2
    assert capsys.readouterr().err == "clover2 tune: nothing to tune\n"


def test_usage_error_exit_keeps_the_message():
    with pytest.raises(SystemExit) as info:
        cli._fail("bench", "--draft x: no such file or directory")
    assert info.value.code == 2 and str(info.value) == "clover2 bench: --draft x: no such file or directory"


# --------------------------------------------------------------------------- help


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_defaults(capsys, command):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "default" in out
    if command in ("train", "features", "self-distill", "bench", "evaluate"):
        assert "(default: None)" not in out


def test_train_bf16_help_is_not_gpu_only(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "float32 master weights (CPU or GPU)" in out
