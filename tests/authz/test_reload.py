"""Hot reload: Kubernetes-style swaps under load, last good on every kind of bad policy."""

from __future__ import annotations

import os
import shutil
import threading
import time
from itertools import count
from pathlib import Path

import pytest

from authz.engine import new_enforcer
from authz.policy import Policy
from authz.reload import Reloader, initial_state, load_candidate
from citadel.errors import PolicyError

REPO = Path(__file__).resolve().parents[2]
MODEL = (REPO / "policies" / "model.conf").read_text()
#: 1-based line of the matcher in the shipped model (errors in it are reported there).
MATCHER_LINE = next(
    i for i, line in enumerate(MODEL.splitlines(), start=1) if line.startswith("m =")
)
SHOP = (REPO / "policies" / "policy.csv").read_text()
FRONTEND = "spiffe://cluster.local/ns/shop/sa/frontend"
ORDERS = "spiffe://cluster.local/ns/shop/sa/orders"
HOST = "orders.shop.svc.cluster.local"

_gen = count()


class ConfigMapDir:
    """A directory updated exactly as the kubelet updates a mounted ConfigMap.

    Real files live in ``..<timestamp>/``; ``..data`` is a symlink to it; each visible
    name is a symlink ``name -> ..data/name``. An update writes a new timestamp dir,
    renames a fresh ``..data_tmp`` symlink over ``..data`` (atomic), then deletes the old.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def write(self, files: dict[str, str | bytes]) -> None:
        old = None
        data = self.root / "..data"
        if data.is_symlink():
            old = self.root / os.readlink(data)
        ts = self.root / f"..2026_11_23_19_00_00.{next(_gen):06d}"
        ts.mkdir()
        for name, text in files.items():
            (ts / name).parent.mkdir(parents=True, exist_ok=True)
            if isinstance(text, bytes):
                (ts / name).write_bytes(text)
            else:
                (ts / name).write_text(text)
        tmp = self.root / "..data_tmp"
        os.symlink(ts.name, tmp)
        os.replace(tmp, data)
        for name in {n.split("/", 1)[0] for n in files}:
            link = self.root / name
            if not link.is_symlink():
                os.symlink(f"..data/{name}", link)
        if old is not None and old.exists():
            shutil.rmtree(old)


def variant(i: int) -> str:
    """Policy i: the shop plus rules whose decisions differ from one i to the next."""
    extra = [f"p, role:storefront, {HOST}, /api/v{i}/*, ^GET$, allow"]
    if i % 2:
        extra.append(f"p, role:storefront, {HOST}, /api/orders/:id, ^DELETE$, allow")
    if i % 3 == 0:
        extra.append(f"p, role:order-service, {HOST}, /api/orders, ^GET$, deny")
    if i % 5 == 0:
        extra.append(f"g, {FRONTEND}, role:internal")
    return SHOP + "\n" + "\n".join(extra) + "\n"


PROBES = [(FRONTEND, HOST, f"/api/v{j}/x", "GET") for j in range(0, 34, 3)] + [
    (FRONTEND, HOST, "/api/orders/7", "DELETE"),
    (FRONTEND, HOST, "/status", "GET"),
    (ORDERS, HOST, "/api/orders", "GET"),
    (FRONTEND, HOST, "/api/orders", "GET"),
    (FRONTEND, HOST, "/admin/x", "GET"),
    ("anonymous", HOST, "/healthz", "GET"),
]


@pytest.fixture
def cm(tmp_path: Path) -> ConfigMapDir:
    d = ConfigMapDir(tmp_path / "policy")
    d.write({"model.conf": MODEL, "policy.csv": variant(0)})
    return d


def wait_for(pred, timeout: float = 3.0) -> float:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(0.005)
    return time.monotonic() - t0


def test_kubernetes_swaps_under_load_never_misdecide(cm: ConfigMapDir) -> None:
    state = initial_state(cm.root)
    policies = {state.revision: Policy.from_texts(MODEL, variant(0))}
    reloader = Reloader(state, cm.root, debounce=0.05, poll_interval=1.0).start()
    seen: set[tuple[tuple[str, str, str, str], bool, str]] = set()
    errors: list[BaseException] = []
    calls = [0]
    stop = threading.Event()

    def load() -> None:
        local: set = set()
        n = 0
        try:
            while not stop.is_set():
                engine = state.engine  # read once: the whole decision is on this revision
                for t in PROBES:
                    d = engine.decide(*t)
                    local.add((t, d.allowed, d.revision))
                    n += 1
                time.sleep(0)  # let others run, as a server's threads do between requests
        except BaseException as exc:  # any error fails the test below
            errors.append(exc)
        seen.update(local)
        calls[0] += n

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    latencies = []
    try:
        for i in range(1, 31):
            p = Policy.from_texts(MODEL, variant(i))
            policies[p.revision] = p
            cm.write({"model.conf": MODEL, "policy.csv": variant(i)})
            latencies.append(wait_for(lambda rev=p.revision: state.revision == rev, 2.0))
    finally:
        stop.set()
        for t in threads:
            t.join()
        reloader.stop()
    assert errors == []
    assert calls[0] > 1000
    assert state.reloads_ok == 30 and state.reloads_failed == 0
    assert max(latencies) < 2.0
    revisions_seen = {rev for _, _, rev in seen}
    assert revisions_seen <= set(policies)
    assert len(revisions_seen) > 5  # the load really ran across the swaps
    enforcers = {rev: new_enforcer(p) for rev, p in policies.items()}
    for t, allowed, rev in sorted(seen):
        assert enforcers[rev].enforce(*t) == allowed, (t, rev)


def test_watch_sees_editor_rename_and_in_place_writes(tmp_path: Path) -> None:
    d = tmp_path / "plain"
    d.mkdir()
    (d / "model.conf").write_text(MODEL)
    (d / "policy.csv").write_text(variant(0))
    state = initial_state(d)
    reloader = Reloader(state, d, debounce=0.05, poll_interval=5.0).start()
    try:
        # Writes before the watch is in place are caught by a poll, not the watch, and so
        # are writes landing during the catch-up poll after its first wake-up: wait until
        # it has seen two batches of events (any file), so the writes below test the watch.
        deadline = time.monotonic() + 10
        for _ in range(2):
            floor = reloader.watch_events
            while reloader.watch_events == floor and time.monotonic() < deadline:
                (d / "notes.txt").write_text(str(time.monotonic()))
                time.sleep(0.05)
        # An editor: write a temp file, rename it over the original.
        tmp = d / ".policy.csv.swp"
        tmp.write_text(variant(1))
        os.replace(tmp, d / "policy.csv")
        rev1 = Policy.from_texts(MODEL, variant(1)).revision
        wait_for(lambda: getattr(reloader.last_outcome, "revision", None) == rev1, timeout=10)
        assert reloader.last_outcome is not None and reloader.last_outcome.trigger == "watch"
        # A shell redirect: truncate and write in place.
        with open(d / "policy.csv", "w") as fh:
            fh.write(variant(2))
        rev2 = Policy.from_texts(MODEL, variant(2)).revision
        wait_for(lambda: reloader.last_outcome.revision == rev2, timeout=10)
        assert reloader.last_outcome.trigger == "watch"
    finally:
        reloader.stop()


def test_poll_only_mode_picks_up_changes(cm: ConfigMapDir) -> None:
    state = initial_state(cm.root)
    reloader = Reloader(state, cm.root, poll_interval=0.05, watch=False).start()
    try:
        cm.write({"model.conf": MODEL, "policy.csv": variant(3)})
        rev = Policy.from_texts(MODEL, variant(3)).revision
        wait_for(lambda: state.revision == rev)
    finally:
        reloader.stop()
    assert reloader.watch_events == 0 and reloader.polls > 0


def test_burst_of_writes_is_debounced(tmp_path: Path) -> None:
    d = tmp_path / "p"
    d.mkdir()
    (d / "model.conf").write_text(MODEL)
    (d / "policy.csv").write_text(variant(0))
    state = initial_state(d)
    reloader = Reloader(state, d, debounce=0.3, poll_interval=5.0).start()
    try:
        time.sleep(0.1)
        for i in range(1, 21):
            (d / "policy.csv").write_text(variant(i))
        rev = Policy.from_texts(MODEL, variant(20)).revision
        wait_for(lambda: state.revision == rev)
    finally:
        reloader.stop()
    assert reloader.attempts < 10, reloader.attempts


def test_unchanged_content_is_a_noop(cm: ConfigMapDir) -> None:
    state = initial_state(cm.root)
    reloader = Reloader(state, cm.root)
    out = reloader.reload_now()
    assert out.ok and not out.changed and out.note == "unchanged"
    assert state.reloads_ok == 0 and len(state.history) == 1
    # Rewriting identical bytes the Kubernetes way is still the same revision.
    cm.write({"model.conf": MODEL, "policy.csv": variant(0)})
    assert reloader.reload_now().changed is False


def test_reload_builds_from_the_serving_engine_and_says_so(cm: ConfigMapDir) -> None:
    """A one-row edit rebuilds only that row's subtree; every revision still decides as
    pycasbin does; a model change, or ``incremental=False``, builds in full."""
    state = initial_state(cm.root)
    reloader = Reloader(state, cm.root, isolate=False)
    for i in (1, 2, 3, 5):
        cm.write({"model.conf": MODEL, "policy.csv": variant(i)})
        out = reloader.reload_now()
        assert out.changed and out.build == "incremental", out
        assert out.rows_rebuilt is not None and out.rows_rebuilt < out.rules
        reference = new_enforcer(Policy.from_texts(MODEL, variant(i)))
        for probe in PROBES:
            assert state.engine.decide(*probe).allowed == reference.enforce(*probe), (i, probe)
    assert state.history[-1].as_dict()["build"] == "incremental"
    cm.write({"model.conf": MODEL + "\n# a comment\n", "policy.csv": variant(5)})
    assert reloader.reload_now().build == "incremental"  # the same model, reworded
    allow_override = MODEL.replace(" && !some(where (p.eft == deny))", "")
    assert allow_override != MODEL
    cm.write({"model.conf": allow_override, "policy.csv": variant(5)})
    assert reloader.reload_now().build == "full"  # another effect: nothing reused
    full = Reloader(state, cm.root, isolate=False, incremental=False)
    cm.write({"model.conf": MODEL, "policy.csv": variant(6)})
    assert full.reload_now().build == "full"


def test_concurrent_explicit_reloads_are_serialised(cm: ConfigMapDir) -> None:
    state = initial_state(cm.root)
    reloader = Reloader(state, cm.root)
    cm.write({"model.conf": MODEL, "policy.csv": variant(4)})
    outcomes = []
    barrier = threading.Barrier(8)

    def go() -> None:
        barrier.wait()
        outcomes.append(reloader.reload_now())

    threads = [threading.Thread(target=go) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(o.ok for o in outcomes)
    assert sum(o.changed for o in outcomes) == 1
    assert state.reloads_ok == 1


BROKEN = {
    "model_syntax_error": (
        {"model.conf": MODEL.replace("[matchers]", "[matchers\n")},
        "model.conf",
        None,
    ),
    "matcher_syntax_error": (
        {"model.conf": MODEL.replace("g(r.sub, p.sub) &&", "g(r.sub, p.sub) && &&")},
        "model.conf",
        MATCHER_LINE,
    ),
    "unknown_function": (
        {"model.conf": MODEL.replace("keyMatch2(", "fooMatch(")},
        "model.conf",
        MATCHER_LINE,
    ),
    "request_arity_not_four": (
        {"model.conf": MODEL.replace("r = sub, dom, obj, act", "r = sub, obj, act")},
        "model.conf",
        None,
    ),
    "malformed_row": ({"policy.csv": "# c\np\n"}, "policy.csv", 2),
    "wrong_arity": ({"policy.csv": f"# c\np, role:x, {HOST}, /a, ^GET$\n"}, "policy.csv", 2),
    "unknown_ptype": ({"policy.csv": "\n\nq, a, b\n"}, "policy.csv", 3),
    "bad_effect": ({"policy.csv": f"p, role:x, {HOST}, /a, ^GET$, maybe\n"}, "policy.csv", 1),
    "policy_not_utf8": (
        {"policy.csv": b"# c\np, role:x, " + HOST.encode() + b", /\xff, ^GET$, allow\n"},
        "policy.csv",
        2,
    ),
    "failing_policy_test": (
        {
            "tests/shop.yaml": (
                "- name: frontend deletes orders\n"
                f"  principal: {FRONTEND}\n  host: {HOST}\n"
                "  method: DELETE\n  path: /api/orders/1\n  expect: allow\n"
            )
        },
        "tests/shop.yaml",
        1,
    ),
    "invalid_test_file": ({"tests/shop.yaml": "- name: x\n  expect: [\n"}, "tests/shop.yaml", 3),
    "model_missing": ({"model.conf": None}, "model.conf", None),
}


@pytest.mark.parametrize("kind", list(BROKEN))
def test_broken_policy_is_refused_and_last_good_serves(cm: ConfigMapDir, kind: str) -> None:
    state = initial_state(cm.root)
    good = state.revision
    engine = state.engine
    changes, file, line = BROKEN[kind]
    files = {"model.conf": MODEL, "policy.csv": variant(0)}
    files.update(changes)
    cm.write({k: v for k, v in files.items() if v is not None})
    out = Reloader(state, cm.root).reload_now()
    assert not out.ok and not out.changed
    assert state.engine is engine and state.revision == good
    assert state.reloads_failed == 1 and state.last_error is not None
    assert state.last_error.file == file
    assert state.last_error.line == line
    assert out.error and good in (out.note or "")
    assert state.engine.decide(FRONTEND, HOST, "/api/orders", "GET").allowed
    with pytest.raises(PolicyError) as exc_info:
        initial_state(cm.root)  # and the same directory at start-up: fail closed
    assert exc_info.value.file == file


def test_role_cycle_is_refused(cm: ConfigMapDir) -> None:
    state = initial_state(cm.root)
    cm.write(
        {"model.conf": MODEL, "policy.csv": variant(0) + "g, role:a, role:b\ng, role:b, role:a\n"}
    )
    out = Reloader(state, cm.root).reload_now()
    assert not out.ok and state.last_error is not None
    assert state.last_error.file == "policy.csv" and state.last_error.line is not None
    assert "cycle" in (out.error or "")


@pytest.mark.parametrize("how", ["removed", "emptied"])
def test_directory_gone_keeps_last_good_then_recovers(cm: ConfigMapDir, how: str) -> None:
    state = initial_state(cm.root)
    good = state.revision
    reloader = Reloader(state, cm.root, debounce=0.05, poll_interval=0.2).start()
    try:
        if how == "removed":
            shutil.rmtree(cm.root)
        else:
            for p in cm.root.iterdir():
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
        # rmtree is not atomic: "is empty" may be seen on the way to "does not exist".
        said = "does not exist" if how == "removed" else "is empty"
        wait_for(lambda: state.last_error is not None and said in (state.last_error.error or ""))
        assert reloader.directory_missing
        assert state.revision == good
        assert good in state.last_error.error
        failed = state.reloads_failed
        time.sleep(0.5)  # polls of the same missing directory are not new failures
        assert state.reloads_failed == failed
        assert state.engine.decide(FRONTEND, HOST, "/api/orders", "GET").allowed
        # The directory comes back with a new policy: it is picked up.
        ConfigMapDir(cm.root).write({"model.conf": MODEL, "policy.csv": variant(7)})
        rev = Policy.from_texts(MODEL, variant(7)).revision
        wait_for(lambda: state.revision == rev)
        assert not reloader.directory_missing
    finally:
        reloader.stop()


def test_start_up_without_valid_policy_fails_closed(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="does not exist"):
        initial_state(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PolicyError, match=r"holds no model\.conf"):
        initial_state(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.conf").write_text(MODEL)
    (bad / "policy.csv").write_text("p, a\n")
    with pytest.raises(PolicyError, match=r"no valid policy in .*policy.csv:1:"):
        initial_state(bad)


def test_load_candidate_reads_one_generation(cm: ConfigMapDir) -> None:
    policy, engine = load_candidate(cm.root)
    assert policy.source == str(cm.root)
    assert engine.revision == Policy.from_texts(MODEL, variant(0)).revision


def test_swap_and_failure_hooks_run_and_cannot_break_reload(cm: ConfigMapDir) -> None:
    state = initial_state(cm.root)
    got: list[str] = []

    def boom(_out) -> None:
        got.append("swap")
        raise RuntimeError("hook bug")

    reloader = Reloader(state, cm.root, on_swap=boom, on_failure=lambda o: got.append("fail"))
    cm.write({"model.conf": MODEL, "policy.csv": variant(1)})
    assert reloader.reload_now().changed
    cm.write({"model.conf": MODEL, "policy.csv": "p, a\n"})
    assert not reloader.reload_now().ok
    assert got == ["swap", "fail"]
    m = reloader.metrics()
    assert m["reloads_ok"] == 1 and m["reloads_failed"] == 1 and m["revision"] == state.revision


# ---------------------------------------------------------------- through the real server


def _check(stub, sub: str, dom: str, obj: str, act: str):
    from envoy.service.auth.v3 import attribute_context_pb2 as ac
    from envoy.service.auth.v3 import external_auth_pb2 as ea

    req = ea.CheckRequest(
        attributes=ac.AttributeContext(
            source=ac.AttributeContext.Peer(principal="" if sub == "anonymous" else sub),
            request=ac.AttributeContext.Request(
                http=ac.AttributeContext.HttpRequest(method=act, host=dom, path=obj)
            ),
        )
    )
    return stub.Check(req, timeout=5)


def test_grpc_checks_during_kubernetes_swaps(start_server, tmp_path: Path) -> None:
    import grpc
    from envoy.service.auth.v3 import external_auth_pb2_grpc as eag
    from google.rpc import code_pb2

    from citadel.audit import read_records

    cm = ConfigMapDir(tmp_path / "policy")
    cm.write({"model.conf": MODEL, "policy.csv": variant(0)})
    srv = start_server(cm.root, reload_debounce_s=0.05, reload_poll_s=1.0)
    state = srv.running.state
    policies = {state.revision: Policy.from_texts(MODEL, variant(0))}
    answers: list[tuple[str, bool]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def load() -> None:
        with grpc.insecure_channel(srv.grpc_target) as ch:
            stub = eag.AuthorizationStub(ch)
            while not stop.is_set():
                for t in PROBES:
                    try:
                        resp = _check(stub, *t)
                    except grpc.RpcError as exc:
                        errors.append(exc)
                        continue
                    ok = resp.status.code == code_pb2.OK
                    hdrs = resp.ok_response.headers if ok else resp.denied_response.headers
                    did = {h.header.key: h.header.value for h in hdrs}["x-citadel-decision-id"]
                    answers.append((did, ok))

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for i in range(1, 13):
            p = Policy.from_texts(MODEL, variant(i))
            policies[p.revision] = p
            cm.write({"model.conf": MODEL, "policy.csv": variant(i)})
            wait_for(lambda rev=p.revision: state.revision == rev, 2.0)
            time.sleep(0.05)  # let some Checks land on each revision
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert errors == []
    records = {
        r["decision_id"]: r for r in read_records([srv.audit_path]) if r["kind"] == "authz.decision"
    }
    assert len(answers) > 200 and len(records) == len(answers)  # one record per Check
    enforcers = {rev: new_enforcer(p) for rev, p in policies.items()}
    expected: dict[tuple, bool] = {}
    revisions = set()
    for did, ok in answers:
        rec = records[did]
        assert (rec["outcome"] == "allow") == ok
        key = (rec["revision"], rec["principal"], rec["host"], rec["path"], rec["method"])
        if key not in expected:
            expected[key] = enforcers[rec["revision"]].enforce(*key[1:])
        assert expected[key] == ok, key
        revisions.add(rec["revision"])
    assert len(revisions) >= 8  # Checks really ran across the swaps


def test_post_reload_uses_the_reloader_and_its_test_gate(start_server, tmp_path: Path) -> None:
    import httpx

    d = tmp_path / "p"
    d.mkdir()
    (d / "model.conf").write_text(MODEL)
    (d / "policy.csv").write_text(variant(0))
    srv = start_server(d, watch_policy=False)
    good = srv.running.state.revision
    with httpx.Client(base_url=srv.admin_url) as c:
        r = c.post("/v1/reload")
        assert r.status_code == 200 and r.json()["changed"] is False
        (d / "tests").mkdir()
        (d / "tests" / "t.yaml").write_text(
            "- name: frontend deletes orders\n"
            f"  principal: {FRONTEND}\n  host: {HOST}\n"
            "  method: DELETE\n  path: /api/orders/1\n  expect: allow\n"
        )
        r = c.post("/v1/reload")  # the policy's own test fails against it: refused
        assert r.status_code == 422
        assert "policy test 'frontend deletes orders' failed" in r.json()["detail"]
        status = c.get("/v1/policy").json()
        assert status["revision"] == good
        assert status["last_error"]["file"] == "tests/t.yaml" and status["last_error"]["line"] == 1
        (d / "policy.csv").write_text(variant(1))  # odd variants allow DELETE: tests pass
        r = c.post("/v1/reload")
        assert r.status_code == 200 and r.json()["changed"] is True
        assert c.get("/v1/policy").json()["revision"] == r.json()["revision"] != good
        text = c.get("/metrics").text
        assert "citadel_authz_reload_attempts_total 3.0" in text
        assert 'citadel_authz_policy_reloads_total{outcome="failed"} 1.0' in text


@pytest.mark.parametrize("defect", ["wrong_arity", "failing_policy_test"])
def test_serve_with_broken_policy_exits_nonzero(tmp_path: Path, defect: str) -> None:
    import subprocess
    import sys

    d = tmp_path / "p"
    d.mkdir()
    (d / "model.conf").write_text(MODEL)
    (d / "policy.csv").write_text(variant(0))
    if defect == "wrong_arity":
        (d / "policy.csv").write_text(f"p, role:x, {HOST}, /a, ^GET$\n")
    elif defect == "failing_policy_test":
        (d / "x.test.yaml").write_text(
            f"- name: nobody\n  host: {HOST}\n  method: GET\n  path: /api/orders\n  expect: allow\n"
        )
    proc = subprocess.run(
        [sys.executable, "-m", "citadel.cli", "authz", "serve", "--policy-dir", str(d),
         "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--audit-log", "-"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert {
        "wrong_arity": "policy.csv:1",
        "failing_policy_test": "policy test 'nobody' failed",
    }[defect] in out
    assert "Traceback" not in out


def test_async_run_task_watches_until_cancelled(cm: ConfigMapDir) -> None:
    import asyncio
    import contextlib

    async def main() -> None:
        state = initial_state(cm.root)
        reloader = Reloader(state, cm.root, debounce=0.05)
        task = asyncio.create_task(reloader.run())
        await asyncio.sleep(0.1)
        cm.write({"model.conf": MODEL, "policy.csv": variant(5)})
        rev = Policy.from_texts(MODEL, variant(5)).revision
        for _ in range(300):
            if state.revision == rev:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert state.revision == rev
        assert reloader._thread is None  # stopped with the task

    asyncio.run(main())
