"""`tfos`: the command line's parser and entry point (`[project.scripts] tfos`).

The train options of `tfos submit` are generated from protocol/options.py, the same
declarations the `%%tf_train` and `%tfos_resume` parsers use, so a flag means the same
thing in a cell and in a shell.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..errors import TfosError
from ..protocol.options import add_arguments
from . import INTERRUPTED
from .parameters import add_parameter_argument, parse_parameters

PROGRESS = {"auto": None, "bar": True, "lines": False}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tfos", description="Train TensorFlow on Spark from a shell: run tfos notebooks headless, re-run "
        "stored jobs without a notebook, and read the job store ($TFOS_HOME).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run", help="execute a notebook headless on the tfos kernel (papermill)",
        description="Execute a notebook on a Jupyter kernel, with its `parameters` cell overridden by -p, and "
        "save the executed copy. Exits 1 when a cell fails, naming the cell and its error.")
    run.add_argument("notebook", type=Path, help="the .ipynb to run; it runs in its own folder")
    add_parameter_argument(run, "set a notebook parameter, after the cell tagged `parameters`")
    run.add_argument("-o", "--output", type=Path, metavar="OUT.ipynb",
                     help="the executed notebook (default: NAME.out.ipynb beside the input)")
    run.add_argument("--html", type=Path, metavar="OUT.html", help="also export the executed notebook as HTML")
    run.add_argument("--kernel", default="tfos", help="kernel spec to run on (default: tfos)")
    run.add_argument("--timeout", type=float, metavar="S",
                     help="interrupt a cell that runs longer than S seconds, and fail (default: no limit)")
    _progress_argument(run)

    submit = commands.add_parser(
        "submit", help="run a stored job from its directory, with no notebook",
        description="Run a stored job in this process: re-run its stored ETL cell on a Spark session like the "
        "one it last ran on, then train with its stored train cell, from its latest checkpoint (or from step "
        "0 with --restart). An option given here replaces the stored one. Exits 0 only if the job succeeded.")
    submit.add_argument("job", help="a job in the store (see `tfos jobs`)")
    add_parameter_argument(submit, "bind a name the stored ETL cell reads, such as a notebook parameter")
    submit.add_argument("--master", metavar="URL",
                        help="Spark master (default: $TFOS_SPARK_MASTER, else the one the job last ran on)")
    add_arguments(submit.add_argument_group(
        "train options", "each replaces the job's stored option for this run and the next ones (the defaults "
        "shown are a new job's)"))
    _progress_argument(submit)

    pack = commands.add_parser(
        "pack-env", help="pack this Python's environment into an archive for --env",
        description="Pack the environment this command runs in (a virtualenv with venv-pack, a conda environment "
        "with conda-pack) into an archive that %%tf_train --env ships to the executors. Editable installs are "
        "packed as wheels built from their source. Prints the option to pass.")
    pack.add_argument("output", metavar="OUT.tar.gz", help="the archive to write (.tar.gz, .tgz or .zip)")
    pack.add_argument("--prefix", metavar="PATH", help="the environment to pack (default: this Python's)")
    pack.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                      help="leave out paths inside the environment that match, e.g. "
                      "'lib/python3.*/site-packages/jupyterlab*' (repeatable)")
    pack.add_argument("--python-prefix", metavar="PATH",
                      help="virtualenvs: where the base Python lives on the executors, if not where it does here")
    pack.add_argument("--compress-level", type=int, default=4, choices=range(10), metavar="0-9",
                      help="gzip level: 0 is fastest, 9 smallest (default: 4)")
    pack.add_argument("--force", action="store_true", help="replace OUT if it exists")

    jobs = commands.add_parser("jobs", help="list the jobs in the store",
                               description="Every job in the store: state, step, loss, last update.")
    jobs.add_argument("--json", action="store_true", help="as a JSON list")

    status = commands.add_parser("status", help="show one job",
                                 description="One job: state, options, latest checkpoint, last metrics.")
    status.add_argument("job")
    status.add_argument("--json", action="store_true", help="as a JSON object")
    return parser


def _progress_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--progress", choices=tuple(PROGRESS), default="auto",
                        help="a progress bar, or a line every 10 s (default: a bar on a terminal)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except TfosError as exc:
        print(f"tfos: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C, or one before a job started
        print("tfos: interrupted", file=sys.stderr)
        return INTERRUPTED
    except BrokenPipeError:  # `tfos jobs | head`: the reader has all it wants
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 1


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "run":
        from .run_notebook import RunRequest, run

        return run(RunRequest(args.notebook, args.output, args.html, parse_parameters(args.parameters),
                              args.kernel, args.timeout, PROGRESS[args.progress]))
    if args.command == "submit":
        from .submit import overrides_from, submit

        return submit(args.job, overrides_from(args), parse_parameters(args.parameters), args.master,
                      PROGRESS[args.progress])
    if args.command == "pack-env":
        from ..driver.pack_env import pack_env

        pack_env(args.output, prefix=args.prefix, exclude=args.exclude, python_prefix=args.python_prefix,
                 compress_level=args.compress_level, force=args.force)
        return 0
    from . import jobs

    if args.command == "jobs":
        return jobs.jobs(args.json)
    return jobs.status(args.job, args.json)
