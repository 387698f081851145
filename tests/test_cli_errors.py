"""Every user mistake is one stderr line naming the flag, key or file, with exit status 2; anything else (a bug) keeps
its traceback. Each case runs through soflow_fast.cli.main; one through a real subprocess."""
import os
import subprocess
import sys

import pytest
import yaml

from soflow_fast.cli import main

VALID = {"model_type": "DiT-S/2", "hidden_size": 32, "depth": 1, "num_heads": 2, "dataset_type": "digits",
         "total_steps": 2, "quality_report": False, "device": "cpu"}


def one_error_line(capsys, argv: list, command: str) -> str:
    """main(argv) exits 2 with exactly one stderr line, 'soflow-fast COMMAND: error: ...'; returns that line."""
    assert main([str(a) for a in argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"soflow-fast {command}: error: "), lines
    return lines[0]


def argparse_error_line(capsys, argv: list, command: str) -> str:
    """A flag rejected by argparse: the same one line and exit status 2 (argparse exits through SystemExit)."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    assert e.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"soflow-fast {command}: error: "), lines
    return lines[0]


def config_file(tmp_path, content, name="c.yaml"):
    path = tmp_path / name
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return path


@pytest.mark.parametrize("content", ["", "# only a comment\n", "{}\n"])
def test_empty_config_is_rejected_naming_the_file(tmp_path, capsys, content):
    path = config_file(tmp_path, content)
    line = one_error_line(capsys, ["train", path], "train")
    assert f"config {path}: no keys" in line


def test_binary_config_names_the_file(tmp_path, capsys):
    path = config_file(tmp_path, b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    line = one_error_line(capsys, ["train", path], "train")
    assert f"config {path}: not a UTF-8 text file (byte 0x89 at offset 0)" in line


def test_config_that_is_a_folder_names_it(tmp_path, capsys):
    line = one_error_line(capsys, ["train", tmp_path], "train")
    assert f"config {tmp_path}: cannot be read" in line


@pytest.mark.parametrize("value", ["[1,", "{a: 1", "'open"])
def test_unparseable_set_value_names_the_flag(tmp_path, capsys, value):
    path = config_file(tmp_path, yaml.safe_dump(VALID))
    line = one_error_line(capsys, ["train", path, "--set", f"time_mean={value}"], "train")
    assert f"--set {'time_mean=' + value!r}: the value is not valid YAML" in line


def test_set_without_a_key_names_the_flag(tmp_path, capsys):
    path = config_file(tmp_path, yaml.safe_dump(VALID))
    assert "--set '=3': expected key=value" in one_error_line(capsys, ["train", path, "--set", "=3"], "train")


@pytest.mark.parametrize("text,key", [("learning_rate: .nan", "learning_rate"), ("p: .inf", "p"),
                                      ("grad_clip: -.inf", "grad_clip"), ("time_std: [1.0, .nan, 0.8]", "time_std")])
def test_non_finite_numbers_name_the_key(tmp_path, capsys, text, key):
    path = config_file(tmp_path, yaml.safe_dump(VALID) + text + "\n")
    line = one_error_line(capsys, ["train", path], "train")
    assert f"config {path}: {key} = " in line and "expected a finite number" in line


@pytest.mark.parametrize("flag", ["--num-samples", "--batch-size", "--nfe"])
@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_sample_counts_must_be_positive(tmp_path, capsys, flag, value):
    line = argparse_error_line(capsys, ["sample", tmp_path / "run", "--out", tmp_path / "s", flag, value], "sample")
    assert f"argument {flag}: expected an integer >= 1, got '{value}'" in line


@pytest.mark.parametrize("value", ["0", "-5"])
def test_max_steps_must_be_positive(tmp_path, capsys, value):
    path = config_file(tmp_path, yaml.safe_dump(VALID))
    line = argparse_error_line(capsys, ["train", path, "--max-steps", value], "train")
    assert f"argument --max-steps: expected an integer >= 1, got '{value}'" in line


def test_sample_out_that_is_a_file(tmp_path, capsys):
    out = config_file(tmp_path, "not a folder", "out.txt")
    line = one_error_line(capsys, ["sample", tmp_path / "run", "--out", out], "sample")
    assert line.endswith(f"--out {out}: it is a file, not a folder")
    line = one_error_line(capsys, ["sample", tmp_path / "run", "--out", out / "deeper"], "sample")
    assert line.endswith(f"--out {out / 'deeper'}: {out} is a file, not a folder")


def test_run_dir_that_is_a_file(tmp_path, capsys):
    path = config_file(tmp_path, yaml.safe_dump(VALID))
    run = config_file(tmp_path, "not a folder", "run.txt")
    line = one_error_line(capsys, ["train", path, "--run-dir", run], "train")
    assert line.endswith(f"--run-dir {run}: it is a file, not a folder")
    path = config_file(tmp_path, yaml.safe_dump({**VALID, "working_dir": str(run / "sub")}))
    line = one_error_line(capsys, ["train", path], "train")
    assert line.endswith(f"config {path}: working_dir = '{run / 'sub'}': {run} is a file, not a folder")


def test_unreadable_checkpoint_is_one_line(tmp_path, capsys):
    """torch.load's weights-only refusal spans several lines; the CLI still prints one line naming the file."""
    bad = config_file(tmp_path, "not a checkpoint", "ref.pt")
    line = one_error_line(capsys, ["import-checkpoint", bad, tmp_path / "ours.pt"], "import-checkpoint")
    assert f"checkpoint {bad}: cannot be read as a weights-only torch checkpoint (" in line
    assert not (tmp_path / "ours.pt").exists()


def test_read_only_output_folders(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("this user (root) may write into a read-only folder")
        path = config_file(tmp_path, yaml.safe_dump(VALID))
        line = one_error_line(capsys, ["train", path, "--run-dir", ro / "run"], "train")
        assert line.endswith(f"--run-dir {ro / 'run'}: {ro} is not writable")
        line = one_error_line(capsys, ["sample", tmp_path / "run", "--out", ro], "sample")
        assert line.endswith(f"--out {ro}: it is not writable")
    finally:
        ro.chmod(0o755)


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    """Only UserError becomes an 'error:' line: a KeyError or ValueError from the code itself propagates."""
    import soflow_fast.config

    for exc in (KeyError("a bug"), ValueError("another bug")):
        def broken(*args, exc=exc):
            raise exc
        monkeypatch.setattr(soflow_fast.config, "load_config", broken)
        with pytest.raises(type(exc)):
            main(["train", str(tmp_path / "c.yaml")])


def test_subprocess_prints_one_line_and_no_traceback(tmp_path):
    path = config_file(tmp_path, "")
    r = subprocess.run([sys.executable, "-m", "soflow_fast", "train", str(path)], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"soflow-fast train: error: config {path}: no keys; a config names at "
                                             "least the model and the data (see configs/, `soflow-fast train "
                                             "--help-config`)"]
