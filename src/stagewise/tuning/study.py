"""The Optuna study behind `stagewise search`: its storage (an SQLite file in the search
directory by default, or any database URL Optuna takes, so workers on several machines share one
study), its sampler and pruner, and the worker processes that run trials until the study holds
`--trials` of them. A search run again with the same directory (or storage and study name)
resumes: finished trials count, and an interrupted trial runs again with the same values, so its
stages resume from their checkpoints in the stage cache."""

from __future__ import annotations

import multiprocessing
import os
import socket
import warnings
import zlib
from pathlib import Path
from typing import Any

from rich.console import Console

from stagewise.errors import RunStopped, UserError
from stagewise.plan.plugins import load_plugins
from stagewise.tuning.trial import SearchSetup, run_trial

HEARTBEAT_SECONDS = 30  # a trial whose worker stopped beating for twice this is failed, then retried


def local_storage(out: Path) -> str:
    """The study's default storage: an SQLite file in the search directory."""
    return f"sqlite:///{(out / 'study.db').resolve()}"


def storage_of(url: str) -> Any:
    import optuna

    # SQLite takes one writer at a time: the others wait for the lock instead of failing at once.
    engine = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # the heartbeat's
            return optuna.storages.RDBStorage(
                url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_SECONDS,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1))
    except (ImportError, ModuleNotFoundError) as e:
        raise UserError("--storage", f"{url}: no database driver for it ({e.name or e})") from None
    except Exception as e:  # sqlalchemy's errors for a bad URL or an unreachable server
        raise UserError("--storage", f"{url}: {str(e).splitlines()[0]}") from None


def _sampler(setup: SearchSetup, worker: int, seen: int) -> Any:
    import optuna

    # Each worker draws from its own seed, and a resumed search from new ones (`seen` trials so far);
    # with a database of the user's (workers on several machines), each machine from its own too.
    shared = setup.storage != local_storage(setup.out)
    host = zlib.crc32(socket.gethostname().encode()) if shared else 0
    seed = (setup.seed * 1009 + worker * 101 + seen + host) % 2**32
    if setup.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # constant_liar
        # constant_liar: running trials count as bad ones, so parallel workers spread out
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True)


def _pruner(name: str) -> Any:
    import optuna

    return {"median": optuna.pruners.MedianPruner, "hyperband": optuna.pruners.HyperbandPruner,
            "none": optuna.pruners.NopPruner}[name]()


def open_study(setup: SearchSetup, worker: int = 0) -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # the search prints its own line per trial
    storage = storage_of(setup.storage)
    try:
        seen = len(storage.get_all_trials(storage.get_study_id_from_name(setup.study)))
    except KeyError:  # a new study
        seen = 0
    study = optuna.create_study(study_name=setup.study, storage=storage, load_if_exists=True,
                                direction=setup.objective.direction, sampler=_sampler(setup, worker, seen),
                                pruner=_pruner(setup.pruner))
    if study.direction.name.lower() != setup.objective.direction:
        raise UserError("--direction", f"study '{setup.study}' in {setup.storage} is set to "
                                       f"{study.direction.name.lower()}; use another --study")
    return study


def _counted() -> tuple[Any, ...]:
    from optuna.trial import TrialState

    # Running trials count (no worker starts one too many); failed ones do not (they run again).
    return (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)


def surplus(study: Any, number: int, trials: int) -> bool:
    """Whether trial `number` is one too many: `trials` counted trials came before it. The check
    after a trial (MaxTrialsCallback) races with the other workers' -- two can finish together and
    both start one more -- but the storage numbers trials one at a time, so this one cannot."""
    earlier = [t for t in study.get_trials(deepcopy=False, states=_counted()) if t.number < number]
    return len(earlier) >= trials


class _Full(Exception):
    """The study held its trials when this worker's next one began: the worker stops."""


def _gone(worker: Any) -> bool:
    """Whether the process that ran a trial is gone: known on its own machine only (a trial of
    another machine's worker is failed by Optuna's heartbeat once it stops beating). This
    process runs no trial yet when it asks."""
    if not isinstance(worker, dict) or worker.get("host") != socket.gethostname():
        return False
    pid = worker.get("pid")
    if not isinstance(pid, int):
        return False
    if pid == os.getpid():  # an earlier search in this process that stopped without saying so
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # another user's process: alive
        return False
    return False


def fail_abandoned(study: Any) -> int:
    """Fail (as interrupted, so they run again) the running trials whose worker is gone: killed
    hard (kill -9, a crash, a power cut), it could not say so; and those of other machines whose
    heartbeat stopped (Optuna retries those itself)."""
    import optuna
    from optuna.trial import TrialState

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    storage, failed = study._storage, 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker")
        if _gone(worker):
            storage.set_trial_user_attr(t._trial_id, "interrupted", f"its worker (process {worker['pid']}) is gone")
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            failed += 1
    return failed


def retry_interrupted(study: Any) -> int:
    """Queue once more each trial a stop interrupted, or whose worker is gone (not yet queued
    again): same values."""
    from optuna.trial import TrialState

    fail_abandoned(study)
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    again = [t for t in trials if t.state == TrialState.FAIL and "interrupted" in t.user_attrs
             and t.number not in retried]
    for t in again:
        study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
    return len(again)


def remaining(study: Any, trials: int) -> int:
    return max(0, trials - len(study.get_trials(deepcopy=False, states=_counted())))


def work(setup: SearchSetup, worker: int = 0, console: Console | None = None) -> None:
    """One worker: trials until the study holds `setup.trials` (other workers' included)."""
    import optuna
    import torch

    if setup.workers > 1:  # the cores are shared between the workers
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // setup.workers))
    console = console or Console(width=160)
    study = open_study(setup, worker)
    if remaining(study, setup.trials) == 0:
        return

    def say(text: str) -> None:
        console.print(text, markup=False, highlight=False)

    def objective(trial: optuna.Trial) -> float:
        if surplus(study, trial.number, setup.trials):
            trial.set_user_attr("surplus", True)
            raise _Full
        return run_trial(setup, trial, say)

    def done(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        value = f"{setup.objective.metric} {trial.value:.4f}" if trial.value is not None else trial.state.name.lower()
        reused = ", ".join(trial.user_attrs.get("reused", [])) or "-"
        say(f"trial {trial.number} {trial.state.name.lower()}: {value} (reused: {reused})")

    try:
        study.optimize(objective, n_trials=setup.trials, catch=(UserError,),
                       callbacks=[done, optuna.study.MaxTrialsCallback(setup.trials, states=_counted())])
    except _Full:  # Optuna has recorded the surplus trial as failed; the table leaves it out
        return


def _worker_main(setup: SearchSetup, worker: int) -> None:
    """A spawned worker process's entry: a stop is one line, as in the CLI."""
    try:
        load_plugins(list(setup.plugins))
        work(setup, worker)
    except UserError as e:
        print(f"error: {e}", flush=True)
        raise SystemExit(2) from None
    except RunStopped as e:
        print(str(e), flush=True)
        raise SystemExit(e.code) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


def run_workers(setup: SearchSetup, console: Console) -> None:
    """`setup.workers` processes on this machine (one in this process), sharing the study."""
    if setup.workers == 1:
        work(setup, 0, console)
        return
    context = multiprocessing.get_context("spawn")  # no forked torch or database state
    processes = [context.Process(target=_worker_main, args=(setup, i), name=f"stagewise-search-{i}")
                 for i in range(setup.workers)]
    for p in processes:
        p.start()
    try:
        for p in processes:
            p.join()
    except KeyboardInterrupt:  # the workers got the same SIGINT: each saves and stops
        for p in processes:
            p.join()
        raise
    failed = [p for p in processes if p.exitcode != 0]
    if failed:
        raise RunStopped(f"{len(failed)} of {setup.workers} search workers stopped (exit codes "
                         f"{', '.join(str(p.exitcode) for p in failed)}); run the search again to resume",
                         code=1)
