"""MLflow tracking: the one place that talks to MLflow about runs.

Training, evaluation and registration share these helpers:

- :func:`configure` points MLflow at ``config.mlflow`` (``MLFLOW_TRACKING_URI`` wins) and caps its
  HTTP retries, so that a dead tracking server costs seconds, not the client's default minutes.
- :class:`TrackedRun` (usually through :func:`open_run`) is one MLflow run that never raises: the
  first failed call logs a warning and turns the run *offline*; every later call is skipped.
  Callers keep their own local record (training writes ``history.csv`` and checkpoints) and can
  replay it into the run later (``unet3plus train --resume`` does that).
- :func:`git_commit` and :func:`data_hash` give the reproducibility tags every run carries.

Tags written by :func:`run_tags`: ``dataset``, ``data_source`` (``synthetic``, ``lits``, ``msd``),
``git_commit``, ``git_dirty``, ``data_hash`` (md5 of the preprocessed manifest and cases metadata),
``dvc_stage`` (from ``DVC_STAGE``, set by ``dvc repro``) and, when the data directory is a DVC
output, ``dvc_md5`` (the directory hash recorded in ``dvc.lock``).

Runs are grouped as users browse them: :func:`study_parent` gives one parent run per study (organ,
data hash, hash of the base parameters), every training run is its child, named by
:func:`run_name` (``liver | unet3plus | resnet101 | DS | CGM | hybrid``) and tagged with its
``ablation`` (``main`` for the main model); :func:`log_datasets` attaches the train/val/test
manifests as MLflow datasets (the UI's Dataset column).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import subprocess
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import mlflow
import yaml
from mlflow.entities import Param, RunTag
from mlflow.exceptions import MlflowException

from unet3plus.config import SQLITE, Config, LossConfig, MlflowConfig
from unet3plus.errors import UserError
from unet3plus.utils import redact

logger = logging.getLogger(__name__)

# MLflow's REST client defaults to 7 retries with exponential backoff and a 120 s timeout: minutes
# of stalled training when the server dies. These apply unless the user exported their own.
HTTP_LIMITS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}


def configure(mlflow_config: MlflowConfig, create: bool = True) -> str:
    """Point MLflow at the configured tracking store and cap HTTP retries and timeouts.

    Args:
        mlflow_config: the ``mlflow`` section; ``MLFLOW_TRACKING_URI`` in the environment wins
            over its ``tracking_uri`` (default ``sqlite:///mlflow.db``: relative to the DVC root in a DVC
            stage, else to the working directory; see :meth:`MlflowConfig.resolved_tracking_uri`).
        create: create a SQLite store that does not exist yet (:func:`create_sqlite_store`); commands
            that only read pass False.

    The HTTP limits (:data:`HTTP_LIMITS`) are set in ``os.environ`` where not already set, so they
    hold for the rest of the process and for its subprocesses.

    Returns:
        The tracking URI now in use.
    """
    for name, value in HTTP_LIMITS.items():
        os.environ.setdefault(name, value)
    uri = _login_to_environment(mlflow_config.resolved_tracking_uri())
    exported = "MLFLOW_TRACKING_URI" in os.environ
    mlflow.set_tracking_uri(uri)
    if not exported:
        # set_tracking_uri also exports the URI, which would then "win" over the config of every
        # later configure() in this process (tests, notebooks, in-process pipelines).
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    if create:
        create_sqlite_store(uri)
    return uri


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Hold, between processes, an exclusive lock on the SQLite store ``uri`` for the block (other stores: no-op).

    The lock is an ``flock`` on the database's folder (created if missing), so nothing is written
    beside ``mlflow.db`` and the kernel releases it however the holder dies. It serialises what
    SQLite's own locking does not: MLflow's schema creation, and find-or-create sequences.
    """
    path = sqlite_path(uri)
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


_CREATED: set[str] = set()
"""SQLite URIs this process has opened through :func:`create_sqlite_store`."""


def create_sqlite_store(uri: str) -> None:
    """Open the SQLite store ``uri`` once per process, under :func:`store_lock`, creating its tables if it is new.

    MLflow creates a new SQLite store's tables (an Alembic migration) in whichever process opens
    it first; two processes opening a new store at the same moment (ablations trained in parallel:
    a ``kfp.local`` ParallelFor, ``dvc queue start --jobs 2``) both migrate it and one of them
    fails ("Online migration expected to match one row ..."). Under the lock the first creates the
    tables and the others find them. Other stores are left alone; a store that cannot be opened
    (its folder is a file, a full disk) is left to fail at the caller's first use, which names it.
    """
    if sqlite_path(uri) is None or uri in _CREATED:
        return
    try:
        with store_lock(uri):
            mlflow.MlflowClient(uri).search_experiments(max_results=1)
    except Exception as err:  # the caller's own MLflow call fails next, with its context
        logger.debug("could not open the SQLite store %s: %s", uri, err)
        return
    _CREATED.add(uri)


UNKNOWN_SOURCE = "unknown"


CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
"""The environment variables MLflow sends as HTTP basic-auth credentials to a tracking server."""


def _login_to_environment(uri: str) -> str:
    """``uri`` without the ``user:password@`` of an HTTP(S) URI, whose login moves to :data:`CREDENTIALS`.

    MLflow then never holds the password in its tracking URI (it prints that URI's host in its
    "View run" lines); the login still reaches the server, unless the variables were set already
    (they win, as they would over the URI's login in the HTTP client). Other URIs (a database
    with its password) are returned as they are: every message shows them through :func:`redact`.
    """
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or "@" not in parts.netloc:
        return uri
    login, _, host = parts.netloc.rpartition("@")
    user, _, password = login.partition(":")
    for name, value in zip(CREDENTIALS, (user, password)):
        if value:
            os.environ.setdefault(name, unquote(value))
    return urlunsplit(parts._replace(netloc=host))


def explain_failure(err: Exception, uri: str) -> str:
    """One line saying why an MLflow call to ``uri`` failed and what to set: login, reachability, registry."""
    code, text, uri = getattr(err, "error_code", None), redact(str(err)), redact(uri)
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if code == "UNAUTHENTICATED":
        missing = [name for name in CREDENTIALS if not os.environ.get(name)]
        if missing:
            return f"the tracking server {uri} requires a login: set {' and '.join(missing)}"
        return (f"the tracking server {uri} rejected the login of MLFLOW_TRACKING_USERNAME={user}: "
                "check MLFLOW_TRACKING_PASSWORD")  # fmt: skip
    if code == "PERMISSION_DENIED":
        return (f"the tracking server {uri} denied MLFLOW_TRACKING_USERNAME={user} this action; ask its admin for "
                "permission or use another account")  # fmt: skip
    if code == "ENDPOINT_NOT_FOUND" or "error code 404" in text:
        return (f"{uri} has no MLflow model registry (its registry API answers 404); set MLFLOW_TRACKING_URI to a "
                "tracking server with a database backend")  # fmt: skip
    if "Failed to establish" in text or "Max retries exceeded" in text or "timed out" in text:
        return f"cannot reach the tracking server {uri}: is it running? (set MLFLOW_TRACKING_URI to its address)"
    return f"{uri}: {text.splitlines()[0] if text else type(err).__name__}"


def check_access(uri: str, registry: bool = False) -> None:
    """Fail fast, before any work is written, when the HTTP tracking server at ``uri`` cannot be used.

    One cheap authenticated request (and one to the model registry with ``registry``); local stores
    (``sqlite:``, folders) are not checked.

    Raises:
        UserError: one line from :func:`explain_failure` (which variable to set, or why the server fails).
    """
    if not uri.startswith(("http://", "https://")):
        return
    client = mlflow.MlflowClient(uri)
    try:
        client.search_experiments(max_results=1)
        if registry:
            client.search_registered_models(max_results=1)
    except MlflowException as err:
        raise UserError(explain_failure(err, uri)) from err


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` tracking URI (None for other stores and in-memory SQLite)."""
    if not uri.startswith(SQLITE) or ":memory:" in uri:
        return None
    return Path(uri.removeprefix(SQLITE).split("?")[0])


def configure_for_reading(mlflow_config: MlflowConfig) -> str:
    """:func:`configure` for commands that only read (``report``, ``predict models:/...``).

    A SQLite store that does not exist is refused rather than created, so a read never leaves an
    empty ``mlflow.db`` behind.

    Raises:
        UserError: the SQLite file does not exist.
    """
    uri = configure(mlflow_config, create=False)
    path = sqlite_path(uri)
    if path is not None and not path.is_file():
        raise UserError(f"{uri}: no MLflow tracking store at {path}; train a model first or point "
                        "MLFLOW_TRACKING_URI (or mlflow.tracking_uri) at your store")
    return uri


@contextlib.contextmanager
def store_errors(mlflow_config: MlflowConfig) -> Iterator[None]:
    """Turn a failure to read the tracking store (not a database, unreachable) into one :class:`UserError`."""
    from sqlalchemy.exc import SQLAlchemyError

    try:
        yield
    except (MlflowException, SQLAlchemyError, OSError) as err:
        message = " ".join(str(err).split())[:300]
        uri = redact(mlflow_config.resolved_tracking_uri())
        raise UserError(redact(f"{uri}: cannot read the MLflow tracking store ({message})")) from err


def experiment_id(client: mlflow.MlflowClient, name: str) -> str:
    """The id of experiment ``name``, created if missing; safe when several processes create it at once.

    A new experiment is a model-training one (the UI then skips its "which kind of experiment?"
    prompt); in a local SQLite store its artifacts go to ``mlruns/<name>/`` beside the database file, so
    they stay with the store wherever the command runs (``dvc exp run --temp`` runs in a copy that
    is deleted afterwards). The first process to create it wins; the others get
    RESOURCE_ALREADY_EXISTS and read its id.
    """
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    database = sqlite_path(client.tracking_uri)
    location = None if database is None else (database.resolve().parent / "mlruns" / quote(name, safe="")).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location,
                                        tags={"mlflow.experimentKind": "custom_model_development"})
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


def git_commit(path: str | os.PathLike = ".") -> str | None:
    """The commit checked out in the git repository containing ``path``, else the one the image was built from.

    Returns:
        The full hash of ``HEAD``; outside a git repository (or without git), ``UNET3PLUS_GIT_COMMIT``
        (set by the project's image from its ``GIT_COMMIT`` build argument), or None.
    """
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        result = None
    if result is not None and result.returncode == 0:
        return result.stdout.strip()
    return os.environ.get("UNET3PLUS_GIT_COMMIT") or None


def git_dirty(path: str | os.PathLike = ".") -> bool | None:
    """Whether the working tree of the git repository containing ``path`` has uncommitted changes.

    Returns:
        True or False, or None outside a git repository (or without git).
    """
    try:
        result = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=path,
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(result.stdout.strip()) if result.returncode == 0 else None


def data_hash(data_dir: str | os.PathLike) -> str:
    """A stable fingerprint of a preprocessed dataset: md5 of ``manifest.csv`` and ``cases.json``.

    The manifest lists every sample and split; ``cases.json`` carries the preprocessing
    fingerprint (inputs and parameters), so any change to the data changes the hash.

    Raises:
        OSError: a file is missing (call after :func:`unet3plus.data.dataset.load_preprocessed`,
            which reports that as a DataError).
    """
    digest = hashlib.md5()
    for name in ("manifest.csv", "cases.json"):
        digest.update((Path(data_dir) / name).read_bytes())
    return digest.hexdigest()


def data_source(data_dir: str | os.PathLike) -> str:
    """Where a preprocessed dataset's raw data came from: ``synthetic``, ``lits``, ``msd`` (``unknown`` if unrecorded).

    Read from ``cases.json`` (see :func:`unet3plus.data.sources.data_source`); data preprocessed
    before it was recorded is ``unknown``.
    """
    try:
        return str(json.loads((Path(data_dir) / "cases.json").read_text()).get("data_source", UNKNOWN_SOURCE))
    except (OSError, ValueError, AttributeError):
        return UNKNOWN_SOURCE


def _dvc_lock_entry(data_dir: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The stage of the nearest ``dvc.lock`` above ``data_dir`` that lists it as an output, and that output.

    None when there is no ``dvc.lock``, it does not list ``data_dir``, or it cannot be parsed.
    """
    data_dir = Path(data_dir).resolve()
    for root in data_dir.parents:
        lock = root / "dvc.lock"
        if not lock.is_file():
            continue
        try:
            stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
        except (OSError, yaml.YAMLError):
            return None
        for stage in stages.values():
            for out in stage.get("outs", []):
                if (root / out.get("path", "")).resolve() == data_dir:
                    return stage, out
        return None
    return None


def dvc_hash(data_dir: str | os.PathLike) -> str | None:
    """The md5 that ``dvc.lock`` records for ``data_dir`` as a stage output, if any."""
    entry = _dvc_lock_entry(data_dir)
    return entry[1].get("md5") if entry else None


def dvc_source(data_dir: str | os.PathLike) -> str | None:
    """Where the DVC stage that wrote ``data_dir`` read its data: its first directory dependency.

    For ``data/processed/liver`` that is the raw dataset (``data/raw/liver``). None when
    ``dvc.lock`` does not list ``data_dir`` as an output.
    """
    entry = _dvc_lock_entry(data_dir)
    return next((dep["path"] for dep in entry[0].get("deps", []) if "nfiles" in dep), None) if entry else None


KFP_RUN_TAGS = {"kfp_run_id": "KFP_RUN_ID", "kfp_run_name": "KFP_RUN_NAME", "kfp_pipeline_version": "KFP_PIPELINE_VERSION"}
"""MLflow tag -> the environment variable a Kubeflow component sets from its run (see components.common)."""


def kfp_tags() -> dict[str, str]:
    """The :data:`KFP_RUN_TAGS` of this process: which Kubeflow run (and pipeline version) wrote the run; {} elsewhere."""
    return {tag: os.environ[variable] for tag, variable in KFP_RUN_TAGS.items() if os.environ.get(variable)}


def run_tags(data_dir: str | os.PathLike, dataset: str) -> dict[str, str]:
    """Reproducibility tags of a run on ``data_dir``: dataset, git commit and dirty flag, data hash(es), DVC stage.

    Values that cannot be determined (no git repository, no DVC lock entry, not run by DVC) are left out.
    """
    dirty = git_dirty()
    tags = {
        "dataset": dataset,
        "data_source": data_source(data_dir),
        "git_commit": git_commit(),
        "git_dirty": None if dirty is None else str(dirty).lower(),
        "data_hash": data_hash(data_dir),
        "dvc_md5": dvc_hash(data_dir),
        "dvc_stage": os.environ.get("DVC_STAGE") or None,
    }
    return {key: value for key, value in tags.items() if value is not None}


def loss_name(loss: LossConfig) -> str:
    """``hybrid`` (focal + MS-SSIM + IoU, the paper's), ``focal``, or the parts in use joined by ``+``."""
    parts = [name for name, weight in (("focal", loss.focal_weight), ("ms-ssim", loss.ms_ssim_weight),
                                       ("iou", loss.iou_weight)) if weight > 0]
    return "hybrid" if len(parts) == 3 else "+".join(parts)


def run_name(config: Config, dataset: str) -> str:
    """What a training run trained, for the runs table: ``liver | unet3plus | resnet101 | DS | CGM | hybrid``."""
    model = config.model
    return " | ".join([dataset, model.arch, model.encoder, "DS" if model.deep_supervision else "no DS",
                       "CGM" if model.cgm else "no CGM", loss_name(config.loss)])


STUDY_SECTIONS = ("model", "loss", "train")


def study_params(config: Config) -> dict[str, str]:
    """The settings that make a study, as MLflow params (strings): every ``model.*``, ``loss.*``, ``train.*``.

    ``train.seed`` is left out: seeds repeat a configuration within its study (the report gives mean and
    spread over them). The data have their own hash; ``evaluate``, ``register`` and ``mlflow`` do not change
    what is trained.
    """
    return {key: str(value) for key, value in config.flat().items()
            if key.partition(".")[0] in STUDY_SECTIONS and key != "train.seed"}


def params_hash(config: Config) -> str:
    """md5 of :func:`study_params`: the base parameters of every run of one study share it."""
    return hashlib.md5(json.dumps(study_params(config), sort_keys=True).encode()).hexdigest()


def study_name(dataset: str, data_digest: str, base: Config) -> str:
    """The ``study`` tag of a study: ``<dataset>-<data hash[:8]>-<params hash[:8]>``."""
    return f"{dataset}-{data_digest[:8]}-{params_hash(base)[:8]}"


def study_parent(mlflow_config: MlflowConfig, dataset: str, data_digest: str, base: Config) -> str | None:
    """The parent run of a study (``dataset``, data hash, hash of the base parameters), created when new.

    The parent is a finished run named ``<dataset> study <data hash[:8]>/<params hash[:8]>``
    tagged ``study`` (:func:`study_name`) and ``study_parent=true``, holding the base parameters
    (:func:`study_params`); every training run
    of the study (the main model and each ablation) is its child, and moves the parent's end time
    to its own end (:meth:`TrackedRun.end`), so the parent's duration spans the study.

    Returns:
        The parent's run id, or None when MLflow fails (a warning; the child then runs alone).
    """
    study = study_name(dataset, data_digest, base)
    try:
        uri = configure(mlflow_config)
        with store_lock(uri):  # one find-or-create at a time on a SQLite store; a server: see below
            return _find_or_create_parent(mlflow.MlflowClient(uri), mlflow_config, study, dataset, data_digest, base)
    except Exception as err:  # tracking must never stop training
        logger.warning("MLflow: could not find or create the parent run of study %s (%s)", study, redact(str(err)))
        return None


def _find_or_create_parent(client: mlflow.MlflowClient, mlflow_config: MlflowConfig, study: str, dataset: str,
                           data_digest: str, base: Config) -> str:
    experiment = experiment_id(client, mlflow_config.experiment)
    query = f"tags.study = '{study}' and tags.study_parent = 'true'"
    found = client.search_runs([experiment], query, max_results=1)
    if found:
        return found[0].info.run_id
    parent = client.create_run(
        experiment,
        run_name=f"{dataset} study {data_digest[:8]}/{params_hash(base)[:8]}",
        tags={"study": study, "study_parent": "true", "dataset": dataset, "data_hash": data_digest, **kfp_tags()},
    )
    client.log_batch(parent.info.run_id, params=[Param(k, v[:6000]) for k, v in study_params(base).items()])
    client.set_terminated(parent.info.run_id, "FINISHED")
    # On a tracking server (no lock) variants of one study started at the same moment (a parallel
    # ablation) may each have created a parent: all of them keep the oldest, the others delete their own.
    oldest = min(client.search_runs([experiment], query), key=lambda run: (run.info.start_time, run.info.run_id))
    if oldest.info.run_id != parent.info.run_id:
        client.delete_run(parent.info.run_id)
    return oldest.info.run_id


def error_text(error: BaseException) -> str:
    """``Type: message`` of ``error`` for a run's ``error`` tag: credentials redacted, at most 8000 characters."""
    return redact(f"{type(error).__name__}: {error}")[:8000]


def record_failure(mlflow_config: MlflowConfig, *, run_name: str, tags: dict[str, str], params: dict[str, Any],
                   parent_run_id: str | None, error: BaseException) -> None:
    """A FAILED run carrying ``error``, for a training that failed before its own run started.

    (Failures inside the run are recorded by :func:`open_run`.) Never raises.
    """
    run = TrackedRun(mlflow_config, run_name=run_name, tags=tags, params=params, parent_run_id=parent_run_id)
    run.set_tags({"error": error_text(error)})
    run.end("FAILED")


def runs_view_url(mlflow_config: MlflowConfig, server: str = "http://127.0.0.1:5000") -> str:
    """The MLflow UI page of the experiment's runs table (model-training view, not the GenAI overview).

    MLflow 3 opens experiments in its GenAI workflow; ``?workflowType=machine_learning`` selects the
    model-training view. Without the experiment (nothing tracked yet) the experiments list.
    """
    try:
        experiment = mlflow.MlflowClient(configure(mlflow_config, create=False)).get_experiment_by_name(mlflow_config.experiment)
    except MlflowException:
        experiment = None
    page = f"#/experiments/{experiment.experiment_id}" if experiment else "#/experiments"
    return f"{server.rstrip('/')}/{page}?workflowType=machine_learning"


def log_datasets(run: TrackedRun, data_dir: str | os.PathLike, dataset: str, manifest: Any) -> None:
    """Attach the train/val/test manifests of ``data_dir`` to ``run`` as MLflow datasets.

    Each split becomes ``mlflow.data.from_pandas`` with digest = :func:`data_hash` (so the UI
    shows one dataset version per preprocessed dataset) and source = the raw data the DVC stage
    read (:func:`dvc_source`), else ``data_dir``.
    """
    import mlflow.data

    digest = data_hash(data_dir)[:32]
    source = dvc_source(data_dir) or str(data_dir)
    for split in ("train", "val", "test"):
        rows = manifest[manifest["split"] == split].reset_index(drop=True)
        # MLflow warns that a local path could be several source types and that integer columns
        # cannot hold missing values (when it infers the schema, at logging); neither applies to a
        # manifest, and both would flood the log.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            frame = mlflow.data.from_pandas(rows, source=source, name=f"{dataset}-{split}", digest=digest)
            run.log_input(frame, split)


class TrackedRun:
    """One MLflow run whose calls never raise.

    On construction it starts a new run, or continues ``run_id`` when given (a run id the store
    does not know starts a new run, with a warning); inside another active run of this thread
    (e.g. an ablation's parent run) a new run is nested under it. Any MLflow failure, at start or later, logs
    one warning and makes the run ``offline``: later calls return without contacting MLflow, so a
    dead server stalls the caller at most once, for the capped retries of :func:`configure`.

    Attributes:
        run_id: the MLflow run id; None if no run could be started.
        offline: True once MLflow failed (or when constructed with ``enabled=False``).
        resumed: True when an existing run is being continued.
    """

    def __init__(
        self,
        mlflow_config: MlflowConfig,
        *,
        run_id: str | None = None,
        run_name: str | None = None,
        tags: dict[str, str] | None = None,
        params: dict[str, Any] | None = None,
        enabled: bool = True,
        parent_run_id: str | None = None,
    ) -> None:
        """Start or continue the run (see the class docstring).

        Args:
            mlflow_config: tracking URI and experiment name.
            run_id: an existing run to continue, or None for a new run.
            run_name: display name of a new run.
            tags: set on the run (new or continued).
            params: logged on a new run only (MLflow params are immutable).
            enabled: False gives an offline run that never contacts MLflow (e.g. DDP ranks > 0).
            parent_run_id: make a new run the child of this run (e.g. :func:`study_parent`).
        """
        self.run_id = run_id
        self.offline = not enabled
        self.resumed = False
        self._started = False
        self._client: mlflow.MlflowClient | None = None
        self._parent_run_id = parent_run_id
        if enabled:
            self._guard("start the run", self._start, mlflow_config, run_name, tags or {}, params or {})

    def _start(
        self, mlflow_config: MlflowConfig, run_name: str | None, tags: dict[str, str], params: dict[str, Any]
    ) -> None:
        uri = configure(mlflow_config)
        client = self._client = mlflow.MlflowClient(uri)
        if self.run_id is not None and not _run_exists(client, self.run_id):
            logger.warning("MLflow run %s not found in %s; starting a new run", self.run_id, redact(uri))
            self.run_id = None
        nested = mlflow.active_run() is not None
        if nested:
            self._parent_run_id = None  # its parent is the active run, not a study to extend in end()
        active = mlflow.start_run(
            run_id=self.run_id,
            experiment_id=experiment_id(client, mlflow_config.experiment),
            run_name=None if self.run_id else run_name,
            nested=nested,
            parent_run_id=None if self.run_id else self._parent_run_id,
            tags={**kfp_tags(), **tags},  # every run written from a Kubeflow pod names its KFP run
            log_system_metrics=mlflow_config.system_metrics,
        )
        self._started = True
        self.resumed = self.run_id is not None
        self.run_id = active.info.run_id
        if params and not self.resumed:
            mlflow.log_params(params, run_id=self.run_id)
        logger.info("MLflow run %s (%s) in %s", self.run_id, "continued" if self.resumed else "new", redact(uri))

    def _guard(self, action: str, function: Any, *args: Any, **kwargs: Any) -> Any:
        """Call ``function`` unless offline; on any failure warn once and go offline."""
        if self.offline:
            return None
        try:
            return function(*args, **kwargs)
        except Exception as err:  # any MLflow, network or store failure must not stop the caller
            self.offline = True
            logger.warning(
                "MLflow tracking failed (could not %s: %s); continuing offline without MLflow for the rest of "
                "this run. Results are kept locally.",
                action,
                explain_failure(err, mlflow.get_tracking_uri()),
            )
            return None

    def last_step(self, key: str) -> int:
        """The highest step logged for metric ``key`` (0 when none, or for a new or offline run)."""
        if not self.resumed:
            return 0
        history = self._guard("read the metric history", self._client.get_metric_history, self.run_id, key)
        return max((metric.step for metric in history or []), default=0)

    def log_input(self, dataset: Any, context: str) -> None:
        """Log an ``mlflow.data`` dataset as an input of the run, used as ``context`` (train, val, test)."""
        self._guard(f"log the {context} dataset", mlflow.log_input, dataset, context=context)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log scalar metrics at ``step``."""
        self._guard("log metrics", mlflow.log_metrics, metrics, step=step, run_id=self.run_id)

    def set_tags(self, tags: dict[str, str]) -> None:
        """Set tags on the run."""
        run_tags = [RunTag(key, str(value)) for key, value in tags.items()]
        self._guard("set tags", lambda: self._client.log_batch(self.run_id, tags=run_tags))

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Upload one local file as an artifact (under ``artifact_path`` if given)."""
        self._guard(f"log artifact {path}", mlflow.log_artifact, str(path), artifact_path, run_id=self.run_id)

    def log_text(self, text: str, artifact_file: str) -> None:
        """Store ``text`` as the artifact ``artifact_file`` (e.g. ``"config.yaml"``)."""
        self._guard(f"log {artifact_file}", mlflow.log_text, text, artifact_file, run_id=self.run_id)

    def end(self, status: str = "FINISHED") -> None:
        """End the run with ``status`` (FINISHED, FAILED or KILLED); safe to call when offline.

        An offline run that was started still gets one attempt, so that MLflow's active-run stack
        and system-metrics thread are released (a dead server fails fast after :func:`configure`).
        """
        if not self._started:
            return
        self._started = False
        if self.offline:
            with contextlib.suppress(Exception):
                mlflow.end_run(status)
            return
        self._guard("end the run", mlflow.end_run, status)
        if self._parent_run_id and not self.offline:
            # The study's parent is closed when created; each child's end moves the parent's end,
            # so the UI shows the study's duration rather than the few milliseconds of its creation.
            self._guard("extend the study run", self._client.set_terminated, self._parent_run_id, "FINISHED",
                        int(time.time() * 1000))


def _run_exists(client: mlflow.MlflowClient, run_id: str) -> bool:
    try:
        return client.get_run(run_id).info.lifecycle_stage == "active"
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise


@contextlib.contextmanager
def open_run(mlflow_config: MlflowConfig, **kwargs: Any) -> Iterator[TrackedRun]:
    """A :class:`TrackedRun` ended on exit: FINISHED, or FAILED/KILLED if the block raised.

    Args:
        mlflow_config: tracking URI and experiment name.
        **kwargs: as :class:`TrackedRun` (``run_id`` to continue e.g. the training run from a
            checkpoint's ``mlflow_run_id``; ``run_name``, ``tags``, ``params``, ``enabled``).

    Example:
        >>> with open_run(config.mlflow, run_id=checkpoint["mlflow_run_id"]) as run:  # doctest: +SKIP
        ...     run.log_metrics({"test_dice": 0.95}, step=0)
    """
    run = TrackedRun(mlflow_config, **kwargs)
    try:
        yield run
    except KeyboardInterrupt:
        run.end("KILLED")
        raise
    except BaseException as err:
        run.set_tags({"error": error_text(err)})
        run.end("FAILED")
        err.mlflow_run_id = run.run_id  # the failure is recorded (see record_failure)
        raise
    run.end("FINISHED")
