"""The options are declared once (protocol/options.py): the magics' parsers, the README
table and the precedence of line, stored run, environment and default all come from there."""

import argparse
from pathlib import Path

import pytest

from tfos_magic.errors import TfosError
from tfos_magic.magics import RESUME, TRAIN
from tfos_magic.protocol.options import TrainOptions, add_arguments, markdown_table, options_from


def _parse(line: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(line.split())


def test_readme_table_is_the_declarations():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert markdown_table() in readme, "README's option table is stale: paste protocol.options.markdown_table()"


def test_every_option_has_a_flag_in_the_magic():
    import dataclasses

    train_flags = {a.dest for a in TRAIN._actions}
    assert {f.name for f in dataclasses.fields(TrainOptions)} <= train_flags
    assert {"background", "rerun_etl", "job"} <= train_flags
    assert {"background", "job"} <= {a.dest for a in RESUME._actions}


def test_line_beats_stored_run_beats_environment_beats_default():
    env = {"TFOS_MAX_RESTARTS": "5", "TFOS_ZOOKEEPER": "zk:2181", "TFOS_WORKERS": "3"}
    opts = options_from(_parse("--workers 2"), env=env)
    assert (opts.workers, opts.max_restarts, opts.zookeeper, opts.epochs) == (2, 5, "zk:2181", 1)
    stored = TrainOptions(workers=4, max_restarts=1, epochs=7)
    opts = options_from(_parse("--epochs 9"), base=stored, env=env)
    assert (opts.workers, opts.max_restarts, opts.epochs) == (4, 1, 9)
    assert options_from(_parse(""), env={}) == TrainOptions()


def test_ps_count_follows_the_strategy():
    assert options_from(_parse("--strategy ps"), env={}).ps == 1
    assert options_from(_parse("--ps 3"), env={}).ps == 0, "no PS tasks in all-reduce mode"
    with pytest.raises(TfosError, match="--ps 1"):
        options_from(_parse("--strategy ps --ps 0"), env={})


@pytest.mark.parametrize("line, flag", [("--workers 0", "--workers"), ("--epochs -1", "--epochs"),
                                        ("--stall-timeout 0", "--stall-timeout")])
def test_bad_values_name_their_flag(line, flag):
    with pytest.raises(TfosError, match=flag):
        options_from(_parse(line), env={})


def test_bad_environment_value_names_the_variable():
    with pytest.raises(TfosError, match="TFOS_MAX_RESTARTS"):
        options_from(_parse(""), env={"TFOS_MAX_RESTARTS": "many"})
