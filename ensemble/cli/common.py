"""Command lines of `launch/train.py`, `launch/evaluate.py` and `launch/generate.py`.

User mistakes (:class:`EnsembleError`) end as one ``error: ...`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import NoReturn

from ensemble.errors import PREEMPTED_EXIT, EnsembleError, Preempted
from ensemble.runtime.launcher import Nodes, launch

USER_ERROR = 2


def _rank() -> int:
    from ensemble.runtime.launch_env import launch_info

    return launch_info().rank


def _where() -> str:
    """`[rank r/W] ` in a multi-process job, else nothing."""
    from ensemble.runtime.launch_env import launch_info

    launch = launch_info()
    return f"[rank {launch.rank}/{launch.world_size}] " if launch.distributed else ""


class _TiedWeightsNote(logging.Filter):
    """Accelerate warns at every checkpoint that it "removed shared tensor lm_head.weight": GPT-2
    ties its output layer to the embedding, which is restored on load (resumes are tested
    bitwise), so the warning says nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in record.getMessage()


class _DefaultLossNote(logging.Filter):
    """transformers warns once per process that "`loss_type=None` was set in the config but it
    is unrecognized" for every GPT-2 config (none sets loss_type); the default it then takes,
    the causal-LM loss, is the one we train with."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "loss_type=None" not in record.getMessage()


def setup_logging() -> None:
    main = _rank() == 0
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        level=logging.INFO if main else logging.WARNING,
        force=True,
    )
    import datasets
    import transformers

    # Accelerate logs every file of every checkpoint at INFO; ours says where each one went.
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    logging.getLogger("accelerate.utils.other").addFilter(_TiedWeightsNote())
    transformers.logging.set_verbosity_warning()
    transformers.utils.logging.disable_progress_bar()  # per-file weight load/save bars are noise here
    logging.getLogger("transformers.modeling_utils").addFilter(_DefaultLossNote())
    # PEFT (adapter members) calls a transformers method transformers deprecates: not the user's to fix
    warnings.filterwarnings(
        "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
    )
    datasets.logging.set_verbosity_warning()
    if not main or not sys.stderr.isatty():  # off a terminal, bar redraws only fill the log
        datasets.disable_progress_bars()


def _line_start() -> str:
    """In a multi-process job the ranks share the terminal, and another rank's progress bar may
    have left the cursor mid-line: start our line on a fresh one."""
    return "\n" if _where() else ""


def guarded(
    main: Callable[[Sequence[str] | None], int | None],
) -> Callable[[Sequence[str] | None], int]:
    """Wrap an entry point: user errors become one line on stderr and exit status 2. A main
    returns None when done, or a status of its own (that of the ranks it launched)."""

    def run(argv: Sequence[str] | None = None) -> int:
        try:
            status = main(argv)
        except EnsembleError as e:
            print(f"{_line_start()}error: {_where()}{e}", file=sys.stderr, flush=True)
            return USER_ERROR
        except Preempted as e:
            print(
                f"{_line_start()}preempted: {_where()}{e}; rerun the same command with --resume auto to continue "
                f"(exit status {PREEMPTED_EXIT})",
                file=sys.stderr,
                flush=True,
            )
            return PREEMPTED_EXIT
        except KeyboardInterrupt:  # Ctrl-C outside training (which checkpoints on it, see StopRequest)
            print(
                f"{_line_start()}interrupted: {_where()}what was written is kept (checkpoints, finished "
                "members, earlier results); rerun the same command (training: with --resume auto) to continue",
                file=sys.stderr,
                flush=True,
            )
            return 130
        except Exception as e:
            # In a multi-process job, say at once which rank failed and why, before the
            # traceback and before the launcher stops the other ranks.
            if _where():
                print(f"{_line_start()}error: {_where()}{type(e).__name__}: {e}", file=sys.stderr, flush=True)
            raise
        return 0 if status is None else status

    return run


def command_parser(
    prog: str, description: str, examples: Sequence[str] = (), notes: str = ""
) -> argparse.ArgumentParser:
    """A command's parser, whose help keeps the line breaks of ``description`` and of the
    epilog: the ``examples`` (one command line each), then ``notes``."""
    lines = ["examples:", *(f"  {e}" for e in examples)] if examples else []
    return argparse.ArgumentParser(
        prog=prog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=description,
        epilog="\n".join([*lines, notes]) if notes else "\n".join(lines),
    )


def exit_statuses(saved: str, resume_note: str = "") -> str:
    """The exit statuses of a command that trains (and so can be preempted)."""
    return (
        f"Exit status: 0 done; 2 a mistake in the input (one error line); {PREEMPTED_EXIT} stopped by "
        f"SIGTERM/SIGUSR1 or Ctrl-C after saving {saved} (continue with --resume auto{resume_note})."
    )


def add_processes_option(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("several processes (instead of torchrun or accelerate launch)")
    g.add_argument(
        "--processes",
        type=int,
        default=1,
        metavar="N",
        help="start N processes of this command on this machine (like torchrun --nproc_per_node N) "
        "and exit with their own status; other launchers (torchrun, accelerate launch) work too",
    )
    g.add_argument(
        "--nodes",
        type=int,
        default=1,
        metavar="K",
        help="machines in the launch, each running this command with --processes N, its own "
        "--node-rank and the same --main-address (slurm/launch_node.sh does this); default 1",
    )
    g.add_argument("--node-rank", type=int, default=0, metavar="I", help="this machine's index, 0 to K-1")
    g.add_argument(
        "--main-address",
        metavar="HOST:PORT",
        help="where the other machines reach machine 0 (it holds the rendezvous on PORT); "
        "needed with --nodes above 1",
    )


def _nodes(args: argparse.Namespace) -> Nodes:
    """The machines of a --processes launch, checked."""
    if args.processes < 1:
        raise EnsembleError(f"--processes {args.processes}: give 1 or more")
    if args.nodes < 1 or not 0 <= args.node_rank < args.nodes:
        raise EnsembleError(
            f"--nodes {args.nodes} --node-rank {args.node_rank}: give 1 or more nodes and a node rank "
            "from 0 to nodes-1"
        )
    if args.main_address is None:
        if args.nodes > 1:
            raise EnsembleError(
                f"--nodes {args.nodes} needs --main-address HOST:PORT, the address of node 0, the "
                "same on every node"
            )
        return Nodes()
    host, _, port = args.main_address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise EnsembleError(f"--main-address {args.main_address}: give HOST:PORT, e.g. node001:29500")
    return Nodes(args.nodes, args.node_rank, host, int(port))


def relaunched(
    args: argparse.Namespace, argv: Sequence[str] | None, entry: Callable[[], object]
) -> int | None:
    """With ``--processes N`` (and ``--nodes``) outside any launcher: run this command as N ranks
    (see :mod:`ensemble.runtime.launcher`) and return their status; None where this process is to do the work."""
    from ensemble.runtime.launch_env import launch_info

    info = launch_info()
    nodes = _nodes(args)
    if info.distributed:  # a rank: of our own launcher (the same arguments), or of another one
        machines = info.world_size // info.local_world_size
        if args.processes not in (1, info.local_world_size) or nodes.count not in (1, machines):
            raise EnsembleError(
                f"--processes {args.processes} --nodes {nodes.count} under a launcher that started "
                f"{info.local_world_size} processes on each of {machines} machine(s); drop --processes "
                "and --nodes (the launcher decides) or run without the launcher"
            )
        return None
    if args.processes * nodes.count == 1:
        return None
    given = list(sys.argv[1:] if argv is None else argv)
    command = ["-c", f"from {entry.__module__} import {entry.__name__}; {entry.__name__}()", *given]
    return launch(command, args.processes, nodes)


def exit_with(code: int) -> NoReturn:
    """End the process of an entry script with ``code``. A process of a multi-process launch
    leaves through `runtime.distributed.leave`, without tearing the interpreter down (see there)."""
    from ensemble.runtime.launch_env import launch_info

    if launch_info().distributed:
        from ensemble.runtime.distributed import leave  # (torch: not imported on a one-process error)

        leave(code)
    sys.exit(code)


def run_or_members(args: argparse.Namespace) -> str | list[str]:
    """The ensemble a command line names: its run directory, or its --members directories."""
    if bool(args.run_dir) == bool(args.members):
        raise EnsembleError("give either a run directory or --members DIR ..., not both or neither")
    return args.run_dir or args.members
