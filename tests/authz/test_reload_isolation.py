"""Reloads that spare the serving process: the helper process and sliced teardown."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from authz.engine import new_enforcer
from authz.loading import BuildWorker
from authz.policy import Policy, load_policy_dir
from authz.reload import (
    IN_PROCESS_LINES,
    Reloader,
    initial_state,
    load_candidate,
    retire,
)
from tests.authz.test_reload import BROKEN, HOST, MODEL, PROBES, ConfigMapDir, variant


def big_variant(i: int) -> str:
    """variant(i) plus more changed lines than a reload parses in the serving process."""
    bulk = (f"p, role:storefront, {HOST}, /bulk{i}/{k}, ^GET$, allow" for k in range(1200))
    assert IN_PROCESS_LINES < 1200
    return variant(i) + "\n".join(bulk) + "\n"


@pytest.fixture(scope="module")
def worker() -> BuildWorker:
    """One helper for the module (spawning one costs about a second)."""
    w = BuildWorker(timeout_s=30)
    w.start()
    assert w.wait_ready(60)
    yield w
    w.close()


@pytest.fixture
def cm(tmp_path: Path) -> ConfigMapDir:
    d = ConfigMapDir(tmp_path / "policy")
    d.write({"model.conf": MODEL, "policy.csv": variant(0)})
    return d


def test_helper_parses_exactly_what_the_serving_process_would(
    worker: BuildWorker, cm: ConfigMapDir
) -> None:
    here = load_policy_dir(cm.root / "..data")
    there = worker.parse(cm.root / "..data")
    assert there == here
    assert worker.pid() not in (None, os.getpid())
    assert worker.fallbacks == 0


def test_swap_through_the_helper_decides_as_pycasbin(worker: BuildWorker, cm: ConfigMapDir) -> None:
    state = initial_state(cm.root)
    reloader = Reloader(state, cm.root)
    reloader.worker = worker
    cm.write({"model.conf": MODEL, "policy.csv": variant(1)})
    out = reloader.reload_now()
    assert out.ok and out.changed and worker.fallbacks == 0
    assert out.cpu_s > 0 and state.history[-1].cpu_s == out.cpu_s  # what the loop lost
    reference = new_enforcer(Policy.from_texts(MODEL, variant(1)))
    for probe in PROBES:
        assert state.engine.decide(*probe).allowed == reference.enforce(*probe), probe


@pytest.mark.parametrize("kind", list(BROKEN))
def test_helper_refuses_what_the_in_process_gate_refuses(
    worker: BuildWorker, tmp_path: Path, kind: str
) -> None:
    changes, file, line = BROKEN[kind]
    files = {"model.conf": MODEL, "policy.csv": variant(0), **changes}
    d = ConfigMapDir(tmp_path / "policy")
    d.write({k: v for k, v in files.items() if v is not None})
    refusals = []
    for w in (worker, None):
        with pytest.raises(Exception) as info:
            load_candidate(d.root, worker=w)
        refusals.append((type(info.value), info.value.message, info.value.file, info.value.line))
    assert refusals[0] == refusals[1]
    assert refusals[0][2:] == (file, line)
    assert worker.fallbacks == 0


def test_a_dead_helper_means_loading_in_process_then_a_new_helper(cm: ConfigMapDir) -> None:
    w = BuildWorker(timeout_s=30)
    try:
        assert not w.ready()  # starting: the first reload does not wait for it
        assert w.wait_ready(60)
        state = initial_state(cm.root)
        reloader = Reloader(state, cm.root)
        reloader.worker = w
        assert reloader.reload_now().note == "unchanged"  # the reader's first, full read
        cm.write({"model.conf": MODEL, "policy.csv": big_variant(1)})
        assert reloader.reload_now().changed and w.fallbacks == 0
        first = w.pid()
        assert first is not None
        os.kill(first, signal.SIGKILL)
        time.sleep(0.2)
        cm.write({"model.conf": MODEL, "policy.csv": big_variant(2)})
        out = reloader.reload_now()
        assert out.ok and out.changed and w.fallbacks == 1  # loaded here, not refused
        assert w.wait_ready(60)  # a new helper
        cm.write({"model.conf": MODEL, "policy.csv": big_variant(3)})
        assert reloader.reload_now().changed and w.fallbacks == 1
        assert w.pid() not in (None, first)
        reference = new_enforcer(Policy.from_texts(MODEL, big_variant(3)))
        for probe in PROBES:
            assert state.engine.decide(*probe).allowed == reference.enforce(*probe), probe
    finally:
        w.close()


def test_small_edits_parse_here_and_large_ones_in_the_helper(
    worker: BuildWorker, cm: ConfigMapDir
) -> None:
    """A few changed lines cost the serving process less than a round trip to the helper;
    more than IN_PROCESS_LINES new or changed lines go to the helper, and the next small
    edit diffs against what the helper parsed. Every revision decides as pycasbin."""
    state = initial_state(cm.root)
    reloader = Reloader(state, cm.root)
    reloader.worker = worker
    reloader.reload_now()  # the reader's first read
    for text, helper_parses in (
        (variant(1), False),
        (big_variant(2), True),
        (big_variant(2) + "p, role:storefront, *, /one, ^GET$, allow\n", False),
        (variant(5), False),  # 1,200 lines deleted: nothing to parse
    ):
        jobs = worker.jobs
        cm.write({"model.conf": MODEL, "policy.csv": text})
        out = reloader.reload_now()
        assert out.ok and out.changed, out
        assert (worker.jobs > jobs) is helper_parses
        if not helper_parses:
            assert reloader.reader.last_parsed <= 5
        reference = new_enforcer(Policy.from_texts(MODEL, text))
        for probe in [*PROBES, (PROBES[0][0], HOST, "/one", "GET")]:
            assert state.engine.decide(*probe).allowed == reference.enforce(*probe), probe
    assert worker.fallbacks == 0


def test_helper_exits_when_the_serving_process_is_killed(tmp_path: Path) -> None:
    script = (
        "import os, signal, sys\n"
        "from authz.loading import BuildWorker\n"
        "if __name__ == '__main__':\n"
        "    w = BuildWorker(); w.start(); assert w.wait_ready(60)\n"
        "    print(w.pid(), flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    (tmp_path / "serve.py").write_text(script)
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "serve.py")], capture_output=True, text=True, timeout=90
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    helper = int(proc.stdout.split()[0])
    deadline = time.monotonic() + 10
    while _alive(helper) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(helper), "the helper outlived its serving process"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_retire_empties_an_engine_nothing_else_holds(cm: ConfigMapDir) -> None:
    _, engine = load_candidate(cm.root)
    for probe in PROBES:
        engine.decide(*probe)
    assert retire(engine)
    assert vars(engine) == {}


def test_retire_leaves_an_engine_in_use_alone(cm: ConfigMapDir) -> None:
    """A decision still running on the old engine holds a reference: nothing is touched."""
    _, engine = load_candidate(cm.root)
    in_use = engine  # noqa: F841  (the second holder)
    expected = [engine.decide(*p).allowed for p in PROBES]
    assert not retire(engine)
    assert [engine.decide(*p).allowed for p in PROBES] == expected
