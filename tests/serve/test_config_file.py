"""Issue 18 feature: ``matrixinfer serve --config FILE.yaml`` sets any serve flag; the command line wins."""

from __future__ import annotations

import pytest

from matrixinfer.cli import build_parser, expand_config_file


def _parse(argv):
    return build_parser().parse_args(expand_config_file(argv))


def test_config_file_sets_flags_and_command_line_wins(tmp_path):
    f = tmp_path / "serve.yaml"
    f.write_text("port: 9001\nmax_num_seqs: 7\ncolocated: true\nreasoning-parser: deepseek-r1\n"
                 "no-prefix-caching: true\nprotect-metrics: false\n")
    args = _parse(["serve", "--config", str(f), "--port", "9002"])
    assert (args.port, args.max_num_seqs, args.colocated, args.reasoning_parser) == (9002, 7, True, "deepseek-r1")
    assert args.enable_prefix_caching is False and args.protect_metrics is False
    assert _parse(["serve", f"--config={f}"]).port == 9001


def test_config_file_errors_name_the_problem(tmp_path, capsys):
    f = tmp_path / "bad.yaml"
    f.write_text("no_such_flag: 1\n")
    with pytest.raises(SystemExit):
        _parse(["serve", "--config", str(f)])
    assert "--no-such-flag" in capsys.readouterr().err
    f.write_text("- a list\n")
    with pytest.raises(SystemExit, match="mapping"):
        _parse(["serve", "--config", str(f)])
    with pytest.raises(SystemExit, match="missing.yaml"):
        _parse(["serve", "--config", str(tmp_path / "missing.yaml")])
