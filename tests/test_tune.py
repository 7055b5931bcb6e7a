"""`cifarlab tune` with its real parts: two worker processes sharing one study on a real PostgreSQL server (started here
on loopback), the embedded SQLite default killed with SIGKILL mid-trial and resumed, a killed worker's trial run again
by the worker beside it, Ctrl-C (status 130, the trial queued again), pruning of a hopeless learning rate, and every bad
input refused with one line and exit status 1 before any training."""
import glob
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import optuna
import pytest
from optuna.storages import RetryHeartbeatStaleTrialCallback

from conftest import BIN, ROOT, env_with_venv, free_port, missing
from cifarlab.cli import main

optuna.logging.set_verbosity(optuna.logging.WARNING)
LR = "{type: float, low: 0.05, high: 1.0, log: true}"


def tiny_space(folder, data_dir, lr=LR, extra="", name="tiny", subset=1500):
    "A search space over quick on `subset` images with a narrow float32 net: a trial on 1500 takes about a second."
    path = Path(folder) / f"{name}.yaml"
    path.write_text(f"""base: {ROOT / 'configs' / 'quick.yaml'}
fixed:
  data.data_dir: {data_dir}
  data.subset: {subset}
  data.val_size: 1000
  trainer.precision: 32-true
  trainer.log_every_n_steps: 1
  model.net.init_args.widths: [8, 16, 16]
space:
  model.lr: {lr}
  data.batch_size: {{type: categorical, choices: [64, 128]}}
{extra}""")
    return path


def tune_cmd(space, root, *extra):
    return [str(BIN / "cifarlab"), "tune", str(space), "--root", str(root), "--probe_every", "500", "--probe_size", "250",
            *map(str, extra)]


def trials(storage, name="tiny"):
    return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)


def states(ts): return sorted(t.state.name for t in ts)


def retried(t): return RetryHeartbeatStaleTrialCallback.retried_trial_number(t)


def wait_for_running_trial(worker, storage, log, after=0):
    """Wait until the study has `after` finished trials and one of `worker`'s trials is training; return that trial with
    the worker stopped (SIGSTOP), so the trial cannot end before the caller's signal: send it, then SIGCONT."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and worker.poll() is None:
        time.sleep(0.2)
        try: ts = trials(storage)
        except Exception: continue  # the study is not created yet
        done = [t for t in ts if t.state.name in ("COMPLETE", "PRUNED")]
        mine = [t for t in ts if t.state.name == "RUNNING" and t.user_attrs.get("worker", "").split(":")[1:2] == [str(worker.pid)]]
        if len(done) >= after and mine and Path(mine[0].user_attrs.get("run_dir", "-")).exists():
            worker.send_signal(signal.SIGSTOP)
            try:
                if trials(storage)[mine[0].number].state.name == "RUNNING": return mine[0]  # still training, now frozen
            except Exception: pass  # frozen while writing: let it finish, look again
            worker.send_signal(signal.SIGCONT)  # it ended between the two looks: wait for the next one
    pytest.fail(f"never saw {after} finished trials and a running one: " + Path(log).read_text()[-2000:])


def hold_until_all_joined(workers, logs, timeout=240):
    """Stop each worker (SIGSTOP) as it joins the study (its first line), then let them all go on at once: however
    unevenly they started, each finds trials left to run."""
    waiting, deadline = set(range(len(workers))), time.monotonic() + timeout
    while waiting and time.monotonic() < deadline:
        for i in list(waiting):
            if workers[i].poll() is not None: pytest.fail(f"worker {i} ended before the others joined: {Path(logs[i]).read_text()[-2000:]}")
            if "trials finished" in Path(logs[i]).read_text():
                workers[i].send_signal(signal.SIGSTOP); waiting.discard(i)
        time.sleep(0.05)
    for w in workers: w.send_signal(signal.SIGCONT)
    assert not waiting, f"workers {sorted(waiting)} did not join within {timeout} s"


# ---------------------------------------------------------------------------------------------------------- bad input

@pytest.fixture(scope="module")
def made_study(tmp_path_factory, data_dir):
    "A study (no trial run) in an SQLite file, made from the tiny space: for the worker that arrives with another space."
    from cifarlab.tune import check_space, load_space, open_storage, open_study
    folder = tmp_path_factory.mktemp("made")
    space = load_space(tiny_space(folder, data_dir))
    url = f"sqlite:///{folder / 'study.db'}"
    open_study(space, open_storage(url), "tiny", check_space(space))
    return url


BAD = {  # what is wrong -> (search-space lines to add / replace, extra flags, what the one line says)
    "unknown recipe key": ("  model.lrr: {type: float, low: 0.1, high: 1.0}\n", [], "model.lrr: not an option of the recipe"),
    "inverted range": ("  model.warmup: {type: float, low: 0.4, high: 0.1}\n", [], "model.warmup: the range [0.4, 0.1] is inverted"),
    "empty range": ("  model.warmup: {type: float, low: 0.1, high: 0.1}\n", [], "model.warmup: the range [0.1, 0.1] is empty"),
    "unknown distribution": ("  model.warmup: {type: loguniform, low: 0.01, high: 0.1}\n", [],
                             "model.warmup: unknown distribution type 'loguniform'"),
    "malformed storage URL": ("", ["--storage", "postgres//lab@127.0.0.1/db"], "malformed storage URL 'postgres//lab@127.0.0.1/db'"),
    "unreachable storage": ("", ["--storage", "postgresql://lab:secret@127.0.0.1:{port}/db"],
                            "cannot open storage postgresql://lab:***@127.0.0.1:{port}/db: "),
    "another search space": ("  model.warmup: {type: float, low: 0.0, high: 0.4}\n", ["--storage", "{made}", "--study", "tiny"],
                             "study 'tiny' in sqlite:///"),
}


@pytest.mark.parametrize("case", BAD, ids=lambda c: c.replace(" ", "-"))
def test_bad_input_one_line(case, tmp_path, data_dir, made_study, capsys):
    lines, flags, says = BAD[case]
    port = free_port()  # nothing listens there
    fill = lambda s: s.format(port=port, made=made_study)
    space = tiny_space(tmp_path, data_dir, extra=lines)
    assert main(["tune", str(space), "--root", str(tmp_path / "runs"), *map(fill, flags)]) == 1
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and err.startswith("cifarlab tune: error: "), err
    assert fill(says) in err, err
    assert "Traceback" not in out + err
    assert not glob.glob(str(tmp_path / "runs" / "*" / "trial-*")), "no trial may start"


# ------------------------------------------------------------------------------------------------------------ pruning

def test_hopeless_lr_is_pruned(tmp_path, data_dir):
    from cifarlab.tune import tune
    space = tiny_space(tmp_path, data_dir, lr="{type: categorical, choices: [0.3, 10000.0]}")
    study = tune(space, n_trials=5, root=tmp_path / "runs", probe_every=250, probe_size=250, prune_after=1, log=lambda _: None)
    ts = study.trials
    assert ts[0].params["model.lr"] == 0.3 and ts[0].state.name == "COMPLETE"  # the base recipe, first
    hopeless = [t for t in ts[1:] if t.params["model.lr"] == 10000.0]
    assert hopeless and all(t.state.name == "PRUNED" for t in hopeless), [(t.params, t.state.name) for t in ts]
    # stopped at the first probe the median pruner judges (the second, 500 images): a third of the 1500-image epoch
    assert all(max(t.intermediate_values) == 500 for t in hopeless)


# ---------------------------------------------------------------------------------- SQLite default: kill -9 and resume

@pytest.mark.slow
def test_sqlite_study_killed_mid_trial_resumes(tmp_path, data_dir):
    space, root = tiny_space(tmp_path, data_dir), tmp_path / "runs"
    storage = f"sqlite:///{root / 'tiny' / 'study.db'}"
    cmd = tune_cmd(space, root, "--n_trials", 3, "--pruner", "none")
    with open(tmp_path / "first.log", "w") as log:
        worker = subprocess.Popen(cmd, cwd=ROOT, env=env_with_venv(), stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for_running_trial(worker, storage, tmp_path / "first.log", after=1)  # one trial done, the next one training
            worker.send_signal(signal.SIGKILL)
        finally:
            worker.wait()
    killed = trials(storage)
    assert states(killed).count("RUNNING") == 1 and "COMPLETE" in states(killed)
    victim = next(t for t in killed if t.state.name == "RUNNING")

    res = subprocess.run(cmd, cwd=ROOT, env=env_with_venv(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    ts = trials(storage)
    assert states(ts) == ["COMPLETE"] * 3 + ["FAIL"], states(ts)  # 3 finished, the killed one failed, none twice
    assert ts[victim.number].state.name == "FAIL"
    assert [t.number for t in ts] == list(range(len(ts)))
    retry = [t for t in ts if retried(t) == victim.number]  # its values ran again
    assert len(retry) == 1 and retry[0].params == victim.params and retry[0].state.name == "COMPLETE"
    finished_before = [t.number for t in killed if t.state.name == "COMPLETE"]
    assert all(ts[n].state.name == "COMPLETE" for n in finished_before)  # kept, not re-run
    assert "of 3): val_acc" in res.stdout and "| best " in res.stdout
    assert (root / "tiny" / "best.yaml").is_file()


# -------------------------------------------------------------------------------------- PostgreSQL: two workers, one study

@pytest.fixture(scope="module")
def postgres():
    "A PostgreSQL server (Debian's package) in a temporary data folder on 127.0.0.1, stopped afterwards: its URL."
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not bins: missing("PostgreSQL is not installed (apt-get install postgresql)")
    bindir = Path(bins[-1]).parent
    data = Path(tempfile.mkdtemp(prefix="cifarlab-pg-"))
    as_owner = []
    if os.geteuid() == 0:  # the server refuses to run as root
        shutil.chown(data, "postgres", "postgres")
        as_owner = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    run = lambda *cmd: subprocess.run([*as_owner, *map(str, cmd)], capture_output=True, text=True, timeout=120)
    try:
        res = run(bindir / "initdb", "-D", data / "db", "-A", "trust", "-U", "lab")
        assert res.returncode == 0, res.stderr
        res = run(bindir / "pg_ctl", "-D", data / "db", "-l", data / "server.log", "-w", "start",
                  "-o", f"-c listen_addresses=127.0.0.1 -p {port} -k {data}")
        assert res.returncode == 0, res.stdout + res.stderr
        yield f"postgresql://lab@127.0.0.1:{port}/postgres"
    finally:
        run(bindir / "pg_ctl", "-D", data / "db", "-m", "fast", "-w", "stop")
        shutil.rmtree(data, ignore_errors=True)


@pytest.mark.slow
def test_two_workers_share_a_postgres_study(tmp_path, data_dir, postgres):
    space, root, n = tiny_space(tmp_path, data_dir), tmp_path / "runs", 4
    cmd = tune_cmd(space, root, "--n_trials", n, "--storage", postgres)
    logs = [open(tmp_path / f"worker{i}.log", "w+") for i in range(2)]
    workers = [subprocess.Popen(cmd, cwd=ROOT, env=env_with_venv(), stdout=f, stderr=subprocess.STDOUT) for f in logs]
    try:
        hold_until_all_joined(workers, [f.name for f in logs])
        codes = [w.wait(timeout=400) for w in workers]
    finally:
        for w in workers:
            if w.poll() is None: w.kill(); w.wait()
    out = [(f.seek(0), f.read())[1] for f in logs]
    assert codes == [0, 0], out
    ts = trials(postgres)
    # none lost, none failed; a worker stops once the study has n finished, so the trial the other is running then
    # finishes too: at most one beyond n
    assert set(states(ts)) <= {"COMPLETE", "PRUNED"} and n <= len(ts) <= n + 1, states(ts)
    assert sorted(t.number for t in ts) == list(range(len(ts)))
    assert len({t.user_attrs["worker"] for t in ts}) == 2, "both workers ran trials"
    assert len({json.dumps(t.params) for t in ts}) == len(ts), "the workers drew the same values"
    assert sorted(p.name for p in (root / "tiny").glob("trial-*")) == [f"trial-{i:04d}" for i in range(len(ts))]  # one folder each
    for t in ts: assert list((root / "tiny" / f"trial-{t.number:04d}").glob("lightning_logs/version_*/config.yaml"))
    assert all(f"of {n})" in o for o in out)


# -------------------------------------------------------------------- a dead worker's trial runs again in another

@pytest.mark.slow
def test_killed_workers_trial_runs_again_beside_it(tmp_path, data_dir):
    space, root = tiny_space(tmp_path, data_dir), tmp_path / "runs"
    storage = f"sqlite:///{root / 'tiny' / 'study.db'}"
    cmd = tune_cmd(space, root, "--n_trials", 4, "--pruner", "none")
    logs = [tmp_path / f"worker{i}.log" for i in range(2)]
    files = [open(f, "w") for f in logs]
    workers = [subprocess.Popen(cmd, cwd=ROOT, env=env_with_venv(), stdout=f, stderr=subprocess.STDOUT) for f in files]
    try:
        victim = wait_for_running_trial(workers[0], storage, logs[0], after=1)
        workers[0].send_signal(signal.SIGKILL); workers[0].wait()
        assert workers[1].wait(timeout=300) == 0, logs[1].read_text()[-2000:]
    finally:
        for w, f in zip(workers, files):
            if w.poll() is None: w.kill(); w.wait()
            f.close()
    ts = trials(storage)
    assert ts[victim.number].state.name == "FAIL" and states(ts).count("RUNNING") == 0, states(ts)
    retry = [t for t in ts if retried(t) == victim.number]
    assert len(retry) == 1 and retry[0].params == victim.params and retry[0].state.name == "COMPLETE", states(ts)
    assert retry[0].user_attrs["worker"].split(":")[1] == str(workers[1].pid)  # the worker beside it ran it
    assert 4 <= len([t for t in ts if t.state.name == "COMPLETE"]) <= 5


def test_silent_worker_elsewhere_is_failed_after_two_heartbeats_and_its_trial_retried(tmp_path, data_dir):
    "A trial whose worker is on another machine (its pid means nothing here) is failed by the heartbeat alone, then re-run."
    from cifarlab.tune import check_space, load_space, open_storage, open_study, tune
    space = load_space(tiny_space(tmp_path, data_dir))
    url = f"sqlite:///{tmp_path / 'study.db'}"
    storage = open_storage(url, heartbeat=1)
    study = open_study(space, storage, "tiny", check_space(space))
    lost = study.ask()  # the queued base recipe, taken by a worker elsewhere that beat once and went silent
    space.suggest(lost)
    lost.set_user_attr("worker", "another-host.example:4242")
    storage.record_heartbeat(lost._trial_id)
    time.sleep(1.0)  # one silent interval: not stale yet
    optuna.storages.fail_stale_trials(study)
    assert study.trials[lost.number].state.name == "RUNNING"
    # past two silent intervals for certain: Optuna compares the database's own clock, which SQLite keeps in whole
    # seconds, so a stale trial needs 3 truncated seconds of silence, which only 3 real ones guarantee
    time.sleep(2.0)
    tune(space, storage=url, study="tiny", n_trials=1, heartbeat=1, root=tmp_path / "runs", probe_every=500,
         probe_size=250, pruner="none", log=lambda _: None)
    ts = trials(url)
    assert ts[lost.number].state.name == "FAIL", states(ts)
    retry = [t for t in ts if retried(t) == lost.number]
    assert len(retry) == 1 and retry[0].params == ts[lost.number].params and retry[0].state.name == "COMPLETE", states(ts)


# ---------------------------------------------------------------------------------------------------------- Ctrl-C

@pytest.mark.slow
def test_ctrl_c_fails_the_trial_queues_it_and_exits_130(tmp_path, data_dir):
    space, root = tiny_space(tmp_path, data_dir), tmp_path / "runs"
    storage = f"sqlite:///{root / 'tiny' / 'study.db'}"
    cmd = tune_cmd(space, root, "--n_trials", 2, "--pruner", "none")
    with open(tmp_path / "first.log", "w") as log:
        # Ctrl-C's default action, even where this run inherited SIGINT ignored (a shell's background job)
        worker = subprocess.Popen(cmd, cwd=ROOT, env=env_with_venv(), stdout=log, stderr=subprocess.STDOUT,
                                  preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            trial = wait_for_running_trial(worker, storage, tmp_path / "first.log")
            worker.send_signal(signal.SIGINT); worker.send_signal(signal.SIGCONT)
            assert worker.wait(timeout=120) == 130, (tmp_path / "first.log").read_text()[-2000:]
        finally:
            if worker.poll() is None: worker.kill(); worker.wait()
    out = (tmp_path / "first.log").read_text()
    assert f"cifarlab tune: interrupted (trial {trial.number} failed and queued again); run the same command to resume" in out
    assert "Traceback" not in out, out[-2000:]
    ts = trials(storage)
    assert ts[trial.number].state.name == "FAIL"
    queued = [t for t in ts if t.state.name == "WAITING"]
    assert len(queued) == 1 and retried(queued[0]) == trial.number and queued[0].params == trial.params
