"""``compresskv demo`` / ``compresskv bench`` refuse a bad option with one line naming the option
and what it takes, and a non-zero exit status, before any model is loaded (issue #12)."""

from __future__ import annotations

import pytest

import compresskv
from compresskv import cli
from tiny_tokenizer import tiny_tokenizer


class ModelLoaded(Exception):
    pass


@pytest.fixture(autouse=True)
def no_model(monkeypatch):
    """Validation must happen before loading: loading a model fails the test."""

    def load_model(*args, **kwargs):
        raise ModelLoaded("a model was loaded")

    monkeypatch.setattr(compresskv, "load_model", load_model)


def exit_status(argv):
    """``compresskv ARGV``'s exit status, whether main returns it or raises SystemExit."""
    try:
        return cli.main(argv)
    except SystemExit as exit_:
        return exit_.code


BAD = [
    # (argv, words the one-line message must hold)
    (["--ratios", "abc"], ["--ratios", "'abc' is not a number", "[0, 1)"]),
    (["--ratios", "1.5"], ["--ratios", "1.5 is outside [0, 1)"]),
    (["--ratios", "1"], ["--ratios", "outside [0, 1)"]),
    (["--ratios", "-0.5"], ["--ratios", "outside [0, 1)"]),
    (["--ratios", "nan"], ["--ratios", "[0, 1)"]),
    (["--ratios", "0.5,x"], ["--ratios", "'x' is not a number"]),
    (["--ratios", ","], ["--ratios", "[0, 1)"]),
    (["--length", "0"], ["--length", "0 is below 1"]),
    (["--length", "-5"], ["--length", "below 1"]),
    (["--length", "4k"], ["--length", "'4k' is not a whole number"]),
    (["--threads", "0"], ["--threads", "0 is below 1"]),
    (["--methods", "snapkv,pyramid"], ["--methods", "pyramid", "pyramidkv", "streamingllm"]),
    (["--methods", ","], ["--methods", "snapkv"]),
    (["--calibration", "no/such/file.txt"], ["--calibration", "no such file", "hf:NAME"]),
    (["--device", "gpu0"], ["--device", "not a torch device", "cpu"]),
    (["--model", "./no/such/model"], ["--model", "no such model directory"]),
]
DEMO_ONLY = [
    (["--seeds", "0,x"], ["--seeds", "'x' is not a whole number"]),
]
BENCH_ONLY = [
    (["--tasks", "niah_single,nosuch"], ["--tasks", "nosuch", "niah_multikey", "perplexity"]),
    (["--tasks", "perplexity"], ["perplexity", "--text"]),
    (["--seeds", "0,one"], ["--seeds", "'one' is not a whole number"]),
    (["--seeds", ""], ["--seeds"]),
    (["--continuation", "0"], ["--continuation", "below 1"]),
    (["--text", "no/such/book.txt"], ["--text", "no such file", "hf:NAME"]),
    (["--text", "hf:"], ["--text", "names no data set"]),
    (["--haystack", "no/such/hay.txt"], ["--haystack", "no such file"]),
]


CASES = [["demo", *a] for a, _ in BAD + DEMO_ONLY] + [["bench", *a] for a, _ in BAD + BENCH_ONLY]
WORDS = [w for _, w in BAD + DEMO_ONLY] + [w for _, w in BAD + BENCH_ONLY]


@pytest.mark.parametrize("argv,words", list(zip(CASES, WORDS)), ids=[" ".join(a) for a in CASES])
def test_bad_option(argv, words, capsys, tmp_path):
    if argv[0] == "bench":
        argv = [*argv, "--out", str(tmp_path / "bench")]
    status = exit_status(argv)
    captured = capsys.readouterr()
    assert status not in (0, None), f"exit status {status}"
    assert "Traceback" not in captured.err
    message = captured.err.strip().splitlines()[-1]
    assert message.startswith(f"compresskv {argv[0]}: error:"), message
    for word in words:
        assert word in message, (word, message)


def test_a_directory_is_not_a_text_file(tmp_path, capsys):
    assert exit_status(["bench", "--calibration", str(tmp_path), "--out", str(tmp_path / "b")]) == 2
    assert "is not a file" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["demo"],
    ["demo", "--ratios", "0,0.5,0.999", "--length", "100", "--seeds", "3", "--threads", "1", "--methods", "snapkv"],
    ["bench", "--ratios", "0.5", "--tasks", "niah_single,vt", "--seeds", "0,1", "--continuation", "8", "--length", "64"],
])
def test_good_options_reach_the_model(argv, tmp_path):
    """Valid values pass: the command goes on to load the model (stubbed here)."""
    with pytest.raises(ModelLoaded):
        cli.main([*argv, "--out", str(tmp_path / "b")] if argv[0] == "bench" else argv)


def test_parsed_values(tmp_path):
    book = tmp_path / "book.txt"
    book.write_text("Some text.")
    args = cli.build_parser().parse_args(["bench", "--text", str(book), "--calibration", "hf:wikitext:wikitext-2-raw-v1"])
    assert args.ratios == [0.5, 0.75, 0.875] and args.seeds == [0] and args.length == 4096
    assert args.text == str(book) and args.calibration == "hf:wikitext:wikitext-2-raw-v1"
    args = cli.build_parser().parse_args(["demo", "--ratios", "0.5,0.875,0.5", "--methods", "snapkv, xkv"])
    assert args.ratios == [0.5, 0.875] and args.methods == ["snapkv", "xkv"]


def test_demo_length_below_the_question_itself(monkeypatch, capsys):
    """`--length 10` passes the parser; once the tokenizer is loaded, a length shorter than the
    needle question itself is refused instead of silently running a longer prompt."""
    monkeypatch.setattr(compresskv, "load_model", lambda *a, **k: (None, tiny_tokenizer()))
    assert exit_status(["demo", "--length", "10", "--device", "cpu", "--threads", "1"]) == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("compresskv demo: error: argument --length: 10 is too short for the needle question")


def test_bench_without_out_writes_under_the_working_directory(tmp_path, monkeypatch):
    """``compresskv bench`` without ``--out`` must not overwrite the package's published
    ``benchmarks/results/bench.*``: its default is relative to where the user runs it."""
    from compresskv.eval.bench import BenchConfig

    args = cli.build_parser().parse_args(["bench"])
    assert not args.out.is_absolute() and "benchmarks" not in args.out.parts
    assert BenchConfig(methods=["snapkv"], ratios=[0.5], tasks=["niah_single"]).out == args.out
    monkeypatch.chdir(tmp_path)
    assert args.out.resolve().is_relative_to(tmp_path.resolve())


def test_version_and_every_option_has_help(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"compresskv {compresskv.__version__}"
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, (name, action.option_strings)


def test_version_and_help_load_no_torch():
    """``compresskv --help``/``--version`` answer at once: nothing imports torch or transformers for
    them (the package's names are imported on first use)."""
    import subprocess
    import sys

    code = ("import sys, contextlib, io\n"
            "from compresskv import cli\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    assert cli.main(['--version']) == 0 and cli.main(['--help']) == 0\n"
            "    assert cli.main(['bench', '--help']) == 0 and cli.main(['demo', '--help']) == 0\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("given, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_the_command_makes_idle_openmp_threads_sleep_before_torch_starts(given, expected):
    """Spinning OpenMP threads stall each other beside any busy process (benchmarks/threads.py):
    the command sets OMP_WAIT_POLICY=PASSIVE before torch (and its OpenMP runtime) is imported,
    and keeps a policy the user chose."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given:
        env["OMP_WAIT_POLICY"] = given
    code = ("import os, sys, contextlib, io\n"
            "from compresskv import cli\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    cli.main(['--version'])\n"
            "print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.split() == [expected, "False"]
