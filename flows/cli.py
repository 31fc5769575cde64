"""``ctl``: the pipeline's console script (``pyproject.toml`` [project.scripts]).

One entry point for what the modules' ``python -m`` commands do, which keep working:

    ctl init FOLDER -w DIR       a new workspace from a folder of labelled images
    ctl benchmark FOLDER         set the fixed benchmark set (cleaned, DVC-tracked)
    ctl run | retrain            the pipeline once: ingest, stages, register, gate, promote
    ctl predict PATH...          score images with the champion (or --model ALIAS|VERSION) into a CSV
    ctl approve | reject V       a person's decision on version V (resumes a run waiting for it)
    ctl demo [--once]            the embedded Fashion-MNIST demo (what ``make demo`` runs)
    ctl up | down | check        the local Prefect server and the served deployments
    ctl up --stack cluster       the same on PostgreSQL, S3, an MLflow server, with credentials,
                                 prefect.yaml's deployments on work pools and their workers
    ctl worker --pool gpu        a worker of the cluster profile, in this checkout (a training machine)
    ctl reproduce V --into DIR   version V's code, params, dvc.lock and data, restored; DVC must call it current
    ctl watch                    one watch-landing tick
    ctl stage NAME               one pipeline step, as DVC runs it (ingest, validate, ...)
    ctl status | history         registry versions and aliases; every alias change
    ctl rollback --reason "..."  champion back to previous (or --to-version N)
    ctl release BATCH --reason   let the next ingest take a batch held for label noise

Every command takes ``--workspace`` (default: the current directory). Heavy imports (torch,
Prefect, MLflow) happen inside the commands, so ``ctl --help`` answers at once, and so the
environment is settled before Prefect reads it: no telemetry, and a run without services keeps
its temporary Prefect API's state in the workspace. A user error is one line on stderr and
exit code 2.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from tasks.common.errors import PipelineError
from tasks.common.stage import STEPS
from tasks.common.workspace import Workspace

app = typer.Typer(
    name="ctl",
    help="Continuous transfer learning of image classifiers: Prefect + DVC + Great Expectations + timm + MLflow.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

Workspace_ = Annotated[
    Path,
    typer.Option("--workspace", "-w", help="the git + DVC repository to work in", file_okay=False, resolve_path=True),
]
Reason = Annotated[str, typer.Option(help="why (recorded in the audit log)")]
Port = Annotated[int, typer.Option(help="Prefect server port on 127.0.0.1 (env PREFECT_PORT)")]
DEFAULT_PORT = int(os.environ.get("PREFECT_PORT", "4200"))

#: Unless the environment says otherwise: no usage reports from Prefect's server (offline they
#: only log "Failed to send telemetry" errors), DVC, or anything honouring DO_NOT_TRACK.
QUIET_ENV = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "DVC_NO_ANALYTICS": "1"}


@app.callback()
def quiet() -> None:
    """Runs before every command, before anything imports Prefect."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


def contain_local_run(ws: Workspace) -> None:
    """A run without a Prefect server starts a temporary API, whose database lives under
    PREFECT_HOME (default ~/.prefect, shared with any server started there): keep it in the
    workspace instead, and say so. Must run before Prefect is imported."""
    if os.environ.get("PREFECT_API_URL"):
        return
    # The first start creates and migrates the database: more than Prefect's 20 s on a small machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    if os.environ.get("PREFECT_HOME"):
        return
    ws.local_prefect_home.mkdir(parents=True, exist_ok=True)  # Prefect creates only the last level
    os.environ["PREFECT_HOME"] = str(ws.local_prefect_home)
    typer.echo(f"no PREFECT_API_URL: this run's Prefect state is kept in {ws.local_prefect_home}", err=True)


@contextmanager
def user_errors(what: str) -> Iterator[None]:
    """A ``PipelineError`` is the user's to fix: one line on stderr, exit code 2, no traceback."""
    try:
        yield
    except PipelineError as exc:
        typer.echo(f"error: {what}: {exc}", err=True)
        raise typer.Exit(2) from None


def workspace(path: Path) -> Workspace:
    if not path.is_dir():
        typer.echo(f"error: workspace {path} is not a directory", err=True)
        raise typer.Exit(2)
    return Workspace(path)


def in_workspace(path: Path, fn: Callable[[], object]) -> object:
    """Run ``fn`` with the workspace as the working directory, as ``python -m`` would."""
    previous = Path.cwd()
    os.chdir(path)
    try:
        return fn()
    finally:
        os.chdir(previous)


@app.command()
def demo(
    ws: Workspace_ = Path("."),
    port: Port = DEFAULT_PORT,
    once: Annotated[bool, typer.Option(help="no services: run the retrain flow once, directly")] = False,
) -> None:
    """The embedded demo: Fashion-MNIST lands in batches and the deployments do the rest."""
    root = workspace(ws)
    if once:
        contain_local_run(root)
    from flows import demo as demo_flow

    demo_flow.run_demo(root, port, once)


@app.command()
def init(
    folder: Annotated[
        Path, typer.Argument(help="labelled images: labels.csv (path,label) or one sub-folder per class")
    ],
    ws: Annotated[Path, typer.Option("--workspace", "-w", help="the new workspace directory (absent or empty)")],
    name: Annotated[
        str | None, typer.Option(help="MLflow registered model name (default: <folder>-classifier)")
    ] = None,
) -> None:
    """Create a workspace (git + DVC, the pipeline code, params.yaml chosen from the images) whose
    first landing batch is FOLDER. The classes come from its labels; image sizes from the files."""
    from tasks.init import create_workspace, describe

    with user_errors("init"):
        typer.echo(describe(create_workspace(folder, ws.resolve(), name)))


@app.command()
def benchmark(
    folder: Annotated[Path, typer.Argument(help="labelled images in a landing batch's layout")],
    ws: Workspace_ = Path("."),
    replace: Annotated[bool, typer.Option(help="replace an existing benchmark set")] = False,
) -> None:
    """Set the fixed benchmark set (data/benchmark): images checked as at ingest, duplicates and
    images also in the training data dropped with a report, then `dvc add`. Commit data/benchmark.dvc."""
    from tasks.benchmark import set_benchmark
    from tasks.common.config import load_params

    root = workspace(ws)
    with user_errors("benchmark"):
        typer.echo(set_benchmark(load_params(root.params), root, folder, replace).summary())
    typer.echo("tracked by DVC: commit it with `git add data/benchmark.dvc && git commit -m benchmark`")


@app.command()
def predict(
    paths: Annotated[list[Path], typer.Argument(help="image files or folders (searched recursively)")],
    ws: Workspace_ = Path("."),
    model: Annotated[
        str, typer.Option(help="an alias (champion, challenger, previous) or a version number")
    ] = "champion",
    out: Annotated[Path, typer.Option(help="the CSV to write")] = Path("predictions.csv"),
    top_k: Annotated[int, typer.Option(min=1, help="how many classes to list per image")] = 3,
) -> None:
    """Score images of any size and mode with a registered version; writes path, class,
    confidence, top-k and error (a file that cannot be decoded) per image."""
    from rich.progress import Progress

    from tasks.common.config import load_params
    from tasks.predict import run_predict

    root = workspace(ws)
    with user_errors("predict"), Progress(transient=True) as progress:
        bar = progress.add_task("scoring", total=None)
        result = run_predict(
            load_params(root.params), root, paths, out, model, top_k,
            lambda done, total: progress.update(bar, advance=done, total=total),
        )  # fmt: skip
    typer.echo(f"{result.scored} image(s) scored with {result.model_uri}, {result.failed} not decodable: {result.out}")


@app.command()
def reproduce(
    version: Annotated[str, typer.Argument(help="the registered version's number")],
    into: Annotated[Path, typer.Option(help="a new (or empty) directory to restore it in", resolve_path=True)],
    ws: Workspace_ = Path("."),
    repo: Annotated[str | None, typer.Option(help="git URL of the code (default: the workspace)")] = None,
    repro: Annotated[bool, typer.Option(help="also run `dvc repro`, which must have nothing to do")] = False,
) -> None:
    """Restore a registered version's code commit, params, dvc.lock, data and outputs into a fresh
    directory (git, MLflow, the DVC remote or this workspace's cache); exit 1 if DVC finds it stale."""
    from tasks.reproduce import run_reproduce

    with user_errors("reproduce"):
        result = run_reproduce(workspace(ws), version, into, repo, repro)
    typer.echo(result.summary())
    if not result.up_to_date:
        raise typer.Exit(1)


STACKS = ("embedded", "cluster")


@app.command()
def up(
    ws: Workspace_ = Path("."),
    port: Port = DEFAULT_PORT,
    interval: Annotated[int | None, typer.Option(help="override params.yaml watch.interval_s")] = None,
    stack: Annotated[
        str, typer.Option(help="embedded: Prefect on SQLite | cluster: PostgreSQL, S3, MLflow server (README)")
    ] = "embedded",
    train_worker: Annotated[
        bool, typer.Option(help="cluster: also start a gpu pool worker on this machine (off when others train)")
    ] = True,
) -> None:
    """Start a Prefect server on 127.0.0.1 and serve the watch-landing and retrain deployments."""
    if stack not in STACKS:
        typer.echo(f"error: up: invalid --stack {stack!r}; supported: {', '.join(STACKS)}", err=True)
        raise typer.Exit(2)
    if stack == "cluster":
        return up_cluster(workspace(ws), port, interval, train_worker)
    from flows import server

    with user_errors("up"):
        url = server.up(workspace(ws), port, interval)
    typer.echo(f"Prefect server and deployments running. UI: {url.removesuffix('/api')}")
    typer.echo(f"export PREFECT_API_URL={url}   # to run flows against it")


def up_cluster(ws: Workspace, port: int, interval: int | None, train_worker: bool) -> None:
    import dataclasses
    import time

    from flows import cluster

    started = time.monotonic()
    with user_errors("up"):
        ports = dataclasses.replace(cluster.Ports.from_env(), prefect=port)
        endpoints = cluster.up(ws, ports, interval, train_worker=train_worker)
    rel = cluster.cluster_dir(ws).relative_to(ws.root)
    typer.echo(f"cluster profile up in {time.monotonic() - started:.0f} s (services bound to {endpoints.host}):")
    typer.echo(f"  PostgreSQL  {endpoints.host}:{endpoints.ports.postgres} (databases {', '.join(cluster.DATABASES)})")
    typer.echo(f"  S3          {endpoints.s3_url} (SeaweedFS; buckets {', '.join(cluster.BUCKETS)})")
    typer.echo(f"  MLflow      {endpoints.mlflow_url} (user {cluster.MLFLOW_ADMIN})")
    typer.echo(f"  Prefect UI  {endpoints.prefect_api.removesuffix('/api')} (user {cluster.PREFECT_USER})")
    typer.echo(f"Credentials: {rel}/credentials.env (mode 0600). To use the services from a shell:")
    typer.echo(f"  set -a; . {rel}/endpoints.env; . {rel}/credentials.env; set +a")
    local = "landing here, gpu in .cache/cluster/train-checkout" if train_worker else "landing here; gpu: none yet"
    typer.echo(f"Workers: {local}. On a training machine, in its checkout: ctl worker --pool gpu")


@app.command()
def worker(
    ws: Workspace_ = Path("."),
    pool: Annotated[str, typer.Option(help="the work pool: gpu (retrains) or landing (watch and predict)")] = "gpu",
    name: Annotated[str | None, typer.Option(help="the worker's name in the Prefect UI")] = None,
) -> None:
    """Run a worker of the cluster profile in this checkout, until interrupted. The environment
    names the services and holds their credentials (endpoints.env and credentials.env)."""
    import os
    import socket
    import sys

    from flows import worker as workers

    if pool not in workers.POOLS:
        typer.echo(f"error: worker: invalid --pool {pool!r}; supported: {', '.join(workers.POOLS)}", err=True)
        raise typer.Exit(2)
    root = workspace(ws)
    with user_errors("worker"):
        workers.prepare_checkout(root)
    name = name or f"{pool}-{socket.gethostname()}-{os.getpid()}"
    os.chdir(root.root)
    os.execve(sys.executable, workers.worker_command(pool, name), workers.worker_env(root.root, dict(os.environ)))


@app.command()
def down(ws: Workspace_ = Path(".")) -> None:
    """Stop exactly the processes ``ctl up`` started."""
    from flows import server

    with user_errors("down"):
        typer.echo("stopped: " + (", ".join(server.down(workspace(ws))) or "nothing was running"))


@app.command()
def check() -> None:
    """Say whether the configured Prefect API answers."""
    from flows import server

    with user_errors("check"):
        typer.echo(f"Prefect API answers at {server.require_api()}")


@app.command()
def retrain(
    ws: Workspace_ = Path("."),
    skip_ingest: Annotated[bool, typer.Option(help="do not look at the landing zone")] = False,
) -> None:
    """Run the retrain flow once: ingest, the DVC stages, register, gate, promote. Against the
    server in PREFECT_API_URL when set, else on a temporary API whose state stays in the workspace."""
    root = workspace(ws)
    contain_local_run(root)
    from flows import retrain as retrain_flow
    from flows.stages import StageFailed

    with user_errors("retrain"):
        try:
            result = retrain_flow.run_once(root, skip_ingest)
        except StageFailed as exc:  # the stage's own message; its log holds any traceback
            typer.echo(f"error: retrain: {exc}", err=True)
            raise typer.Exit(2 if exc.kind == "user" else 1) from None
    typer.echo(json.dumps(result, indent=2, default=str))


app.command(name="run", help="The same as `ctl retrain`: the whole pipeline once on the workspace's data.")(retrain)


@app.command()
def watch(ws: Workspace_ = Path(".")) -> None:
    """Run one watch-landing tick against the configured Prefect server."""
    from flows import watch as watch_flow

    with user_errors("watch"):
        result = watch_flow.run_tick(workspace(ws))
    typer.echo(json.dumps(result, indent=2, default=str))


@app.command()
def stage(
    name: Annotated[str, typer.Argument(help=f"one of: {', '.join(STEPS)}")],
    ws: Workspace_ = Path("."),
) -> None:
    """Run one pipeline step as its ``python -m tasks.<name>`` command does. The DVC stages'
    commands are those; ``dvc repro NAME`` runs one and records it in dvc.lock."""
    if name not in STEPS:
        typer.echo(f"error: stage: unknown step {name!r}; supported: {', '.join(STEPS)}", err=True)
        raise typer.Exit(2)
    module = importlib.import_module(f"tasks.{name}")
    in_workspace(workspace(ws).root, module.main)


@app.command()
def status(ws: Workspace_ = Path(".")) -> None:
    """Registered versions, their aliases and the gate's verdict on each."""
    from tasks import promote

    with user_errors("status"):
        typer.echo(promote.format_status(workspace(ws)))


@app.command()
def history(ws: Workspace_ = Path(".")) -> None:
    """Every alias change (promote, reject, rollback), oldest first."""
    from tasks import promote

    with user_errors("history"):
        typer.echo(promote.format_audit(workspace(ws)))


@app.command()
def approve(
    version: Annotated[str, typer.Argument(help="the version to make champion")],
    reason: Reason,
    ws: Workspace_ = Path("."),
) -> None:
    """A person's decision: make VERSION the champion (the old one becomes previous). A retrain
    waiting for approval (gate.approval: manual) continues with this decision."""
    _decide(ws, version, True, reason)


@app.command()
def reject(
    version: Annotated[str, typer.Argument(help="the version to reject")],
    reason: Reason,
    ws: Workspace_ = Path("."),
) -> None:
    """A person's decision: record VERSION as rejected; the champion does not move. A retrain
    waiting for approval (gate.approval: manual) continues with this decision."""
    _decide(ws, version, False, reason)


def _decide(ws: Path, version: str, approve: bool, reason: str) -> None:
    from flows.approval import resume_waiting_run
    from tasks import promote

    root = workspace(ws)
    with user_errors("approve" if approve else "reject"):
        if run := resume_waiting_run(root, version, approve, reason):
            typer.echo(f"retrain {run} was waiting for a decision on v{version}: resumed with it")
            return
        typer.echo(promote.decide_version(root, version, approve, reason))


@app.command()
def rollback(
    reason: Reason,
    to_version: Annotated[str | None, typer.Option(help="default: the version with alias 'previous'")] = None,
    ws: Workspace_ = Path("."),
) -> None:
    """Move the champion back to the previous version (or to --to-version)."""
    from tasks import promote

    with user_errors("rollback"):
        typer.echo(promote.rollback_champion(workspace(ws), reason, to_version))


@app.command()
def release(
    batch: Annotated[str, typer.Argument(help="a landing batch held as label_noise_suspected")],
    reason: Reason,
    ws: Workspace_ = Path("."),
) -> None:
    """Let the next ingest take BATCH, which the label-noise screen held, without that screen
    (its other checks still apply). Recorded in the audit log (`ctl history`)."""
    from tasks.common.config import load_params
    from tasks.label_noise import release_batch

    root = workspace(ws)
    with user_errors("release"):
        typer.echo(release_batch(load_params(root.params), root, batch, reason))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
