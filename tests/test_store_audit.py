"""The control-plane store and the hash-chained audit log, each test on a fresh SQLite file and a fresh PostgreSQL
database (team mode's cluster; tests/conftest.py `store_url`)."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, text
from testing_utils import files_holding

from tasks import store
from tasks.core.errors import AccessError, ConfigError, GatewayError
from tasks.store import audit


@pytest.fixture()
def engine(store_url: str) -> Engine:
    return store.get_engine(store_url)


def _sql(engine: Engine, statement: str, **params: object) -> None:
    """Change rows behind the store's back, as someone with database access could."""
    with engine.begin() as c:
        c.execute(text(statement), params)


def test_key_lifecycle(engine: Engine, tmp_path: Path):
    created = store.create_key("alice", team="ml", expires_in=timedelta(days=30), actor="admin",
                               engine=engine)
    raw, info = created.raw, created.info
    prefix, secret = store.split_key(raw)
    assert raw.startswith(f"llmh-{prefix}-") and info.prefix == prefix and len(secret) >= 40
    got = store.verify_key(raw, engine=engine)
    assert (got.user, got.team, got.prefix) == ("alice", "ml", prefix)
    assert got.expires_at is not None
    assert timedelta(days=29) < got.expires_at - store.utcnow() <= timedelta(days=30)

    with pytest.raises(AccessError, match="not valid"):
        store.verify_key(f"llmh-{prefix}-{'x' * 43}", engine=engine)
    with pytest.raises(AccessError, match="malformed"):
        store.verify_key("sk-not-ours", engine=engine)

    store.revoke_key(prefix, actor="admin", engine=engine)
    with pytest.raises(AccessError, match="revoked"):
        store.verify_key(raw, engine=engine)
    assert [k.revoked_at is not None for k in store.list_keys(engine=engine)] == [True]

    # only a salted scrypt hash is stored
    with engine.connect() as c:
        row = c.execute(text("SELECT salt, key_hash FROM api_keys")).one()
    assert row[1].startswith("scrypt:") and secret not in row[1]
    # SQLite: not in the file or its WAL either
    assert files_holding(tmp_path.glob("store.db*"), {"the secret": secret.encode()}) == []


def test_expired_key_is_refused(engine: Engine):
    created = store.create_key("bob", expires_in=timedelta(seconds=0.05), engine=engine)
    time.sleep(0.1)
    with pytest.raises(AccessError, match="expired"):
        store.verify_key(created.raw, engine=engine)
    with pytest.raises(ConfigError):
        store.create_key("bob", expires_in=timedelta(seconds=-1), engine=engine)


def test_parse_duration():
    assert store.parse_duration("30d") == timedelta(days=30)
    assert store.parse_duration("1h") == timedelta(hours=1)
    assert store.parse_duration("90s") == timedelta(seconds=90)
    with pytest.raises(ConfigError, match="30d"):
        store.parse_duration("soon")


def test_endpoints_revisions_replicas_and_grants(engine: Engine):
    store.upsert_endpoint("router", description="routes tickets", owner="ops", actor="admin", engine=engine)
    spec = {"model": "m", "version": "1", "vllm": {"max_model_len": 1024}}
    r1 = store.add_revision("router", spec, served_model_name="router", model_version="1", engine=engine)
    again = store.add_revision("router", dict(reversed(spec.items())), served_model_name="router",
                               engine=engine)
    assert again.id == r1.id and r1.content_hash == store.spec_hash(spec)  # content-addressed
    r2 = store.add_revision("router", {**spec, "version": "2"}, served_model_name="router", model_version="2",
                            adapters={"tools": "router-tools"}, engine=engine)
    store.add_replica("router", r1.content_hash[:10], base_url="http://127.0.0.1:9001",
                      served_model_name="router", state="up", engine=engine)
    rep = store.add_replica("router", r2.id, base_url="http://127.0.0.1:9002/v1", served_model_name="router",
                            state="starting", engine=engine)
    assert rep.base_url == "http://127.0.0.1:9002/v1"

    epoch0, routes = store.load_routes(engine=engine)
    assert routes["router"].revision_id is None  # nothing live yet
    store.set_live_revision("router", r1.id, actor="admin", engine=engine)
    store.set_live_revision("router", r2.content_hash[:12], reason="better eval", actor="admin",
                            engine=engine)
    assert [r.status for r in store.list_revisions("router", engine=engine)] == ["retired", "live"]

    key = store.create_key("carol", team="support", engine=engine).info
    assert store.grant("router", team="support", actor="admin", engine=engine) is True
    assert store.grant("router", team="support", actor="admin", engine=engine) is False
    epoch1, routes = store.load_routes(engine=engine)
    route = routes["router"]
    assert epoch1 > epoch0
    assert route.revision_hash == r2.content_hash and route.adapters == {"tools": "router-tools"}
    assert [r.base_url for r in route.replicas] == ["http://127.0.0.1:9002/v1"] and route.allows(key)

    store.set_replica_state(rep.id, "stopped", actor="deploy", engine=engine)
    assert store.load_routes(engine=engine)[1]["router"].replicas == ()  # stopped replicas are not routed to
    assert store.revoke_grant("router", team="support", actor="admin", engine=engine) is True
    assert not store.load_routes(engine=engine)[1]["router"].allows(key)
    assert store.list_grants(engine=engine) == []

    with pytest.raises(GatewayError, match="endpoints attach"):
        store.add_revision("nope", spec, served_model_name="x", engine=engine)
    with pytest.raises(ConfigError, match="adapters"):
        store.upsert_endpoint("bad:name", engine=engine)

    actions = [e.action for e in audit.entries(endpoint="router", engine=engine)]
    assert actions.count("endpoint.route") == 2 and "access.grant" in actions and "access.revoke" in actions
    route_entry = [e for e in audit.entries(action="endpoint.route", engine=engine)][-1]
    assert r1.content_hash[:12] in route_entry.before and r2.content_hash[:12] in route_entry.after


def test_routes_read_while_the_epoch_moves_are_read_again_and_a_store_that_never_settles_raises(
        engine: Engine, monkeypatch: pytest.MonkeyPatch):
    """A writer commits between the read of the routes and the check of the epoch: the routes are read again;
    one that commits during every read gives a typed error after ROUTES_READ_TRIES reads, not an endless loop."""
    from tasks.store import routes as routes_mod
    from tasks.store.schema import bump_epoch, session_scope

    store.upsert_endpoint("churn", owner="admin", actor="admin", engine=engine)
    real_epoch = routes_mod.routes_epoch
    writes = {"left": 1}

    def a_writer_commits_first(engine: Engine | None = None) -> int:
        if writes["left"]:
            writes["left"] -= 1
            with session_scope(engine) as s:  # another process's change, committed in its own transaction
                bump_epoch(s)
        return real_epoch(engine)

    monkeypatch.setattr(routes_mod, "routes_epoch", a_writer_commits_first)
    before = real_epoch(engine)
    epoch, routes = store.load_routes(engine=engine)
    assert epoch == before + 1 == real_epoch(engine) and "churn" in routes  # read again, as of the new epoch

    writes["left"] = 10**6
    with pytest.raises(routes_mod.RoutesUnsettledError, match="moved during each of 20 reads"):
        store.load_routes(engine=engine)
    assert 10**6 - writes["left"] == routes_mod.ROUTES_READ_TRIES


def test_a_health_probe_never_overwrites_a_stopped_replica(engine: Engine):
    """The gateway's probe that was in flight when `endpoints stop` ran must not turn 'stopped' back into 'down'."""
    from tasks.store.routes import record_replica_health

    store.upsert_endpoint("probe", actor="admin", engine=engine)
    rev = store.add_revision("probe", {"model": "m"}, served_model_name="probe", engine=engine)
    rep = store.add_replica("probe", rev.id, base_url="http://127.0.0.1:9201", served_model_name="probe",
                            state="starting", engine=engine)
    assert record_replica_health(rep.id, "up", engine=engine) is True
    assert record_replica_health(rep.id, "up", engine=engine) is False  # unchanged: no write
    store.set_replica_state(rep.id, "stopped", actor="deploy", engine=engine)
    assert record_replica_health(rep.id, "down", engine=engine) is False
    assert [r.state for r in store.list_replicas("probe", rev.id, engine=engine)] == ["stopped"]
    with pytest.raises(ConfigError, match="'up' or 'down'"):
        record_replica_health(rep.id, "stopped", engine=engine)


def test_attach_server_adds_replicas_to_the_same_revision(engine: Engine):
    rev1, _ = store.attach_server("ext", base_url="http://127.0.0.1:9101/v1", served_model="m", engine=engine)
    rev2, _ = store.attach_server("ext", base_url="http://localhost:9101/v1", served_model="m", engine=engine)
    assert rev1.id == rev2.id and len(store.list_replicas("ext", engine=engine)) == 2
    rev3, _ = store.attach_server("ext", base_url="http://127.0.0.1:9102/v1", served_model="m2",
                                  engine=engine)
    assert rev3.id != rev1.id
    view = {e.name: e for e in store.list_endpoints(engine=engine)}["ext"]
    assert view.served_model_name == "m2" and [r.base_url for r in view.replicas] == ["http://127.0.0.1:9102/v1"]


def test_usage_rows_and_summary(engine: Engine):
    now = store.utcnow()
    base = {"key_prefix": "abcd1234", "user": "u", "team": "t", "endpoint": "e", "route": "chat",
            "latency_ms": 10.0}
    store.add_usage([
        {**base, "ts": now - timedelta(hours=2), "status_code": 200, "prompt_tokens": 5,
         "completion_tokens": 7},
        {**base, "ts": now, "status_code": 200, "prompt_tokens": 3, "completion_tokens": 4, "ttft_ms": 2.0,
         "stream": True},
        {**base, "ts": now, "status_code": 503},
    ], engine=engine)
    assert len(store.list_usage(engine=engine)) == 3
    assert len(store.list_usage(since=now - timedelta(hours=1), engine=engine)) == 2
    (s,) = store.summarize_usage(endpoint="e", engine=engine)
    assert (s.requests, s.errors, s.prompt_tokens, s.completion_tokens, s.avg_ttft_ms) == (3, 1, 8, 11, 2.0)
    (recent,) = store.summarize_usage(since=now - timedelta(minutes=5), engine=engine)
    assert (recent.requests, recent.prompt_tokens) == (2, 3)


def test_audit_chain_verifies_and_detects_edits(engine: Engine):
    store.create_key("dave", team="ml", actor="admin", engine=engine)
    store.upsert_endpoint("ep", owner="ops", actor="admin", engine=engine)
    store.grant("ep", user="dave", actor="admin", engine=engine)
    audit.record("deployer", "deploy.promote", "endpoint:ep", {"revision": "a"}, {"revision": "b"},
                 engine=engine, endpoint="ep", model_version="3")
    ok = audit.verify(engine=engine)
    assert ok.ok and ok.entries == 4, ok.summary()

    _sql(engine, "UPDATE audit_log SET actor = 'mallory' WHERE seq = 2")
    bad = audit.verify(engine=engine)
    assert not bad.ok and bad.bad_seq == 2 and "edited" in bad.problem

    _sql(engine, "UPDATE audit_log SET actor = 'admin' WHERE seq = 2")  # put it back: verifies again
    assert audit.verify(engine=engine).ok

    # Recomputing the edited row's own hash does not help: the next row's link breaks.
    _sql(engine, "UPDATE audit_log SET after = :after WHERE seq = 3", after='{"endpoint":"ep","user":"mallory"}')
    with store.session_scope(engine) as s:
        e = s.get(store.AuditEntry, 3)
        forged = audit.entry_hash(e)
    _sql(engine, "UPDATE audit_log SET hash = :forged WHERE seq = 3", forged=forged)
    bad = audit.verify(engine=engine)
    assert not bad.ok and bad.bad_seq == 4 and "prev_hash" in bad.problem

    _sql(engine, "DELETE FROM audit_log WHERE seq = 3")
    assert audit.verify(engine=engine).bad_seq == 3


def test_audit_cli_verify_fails_on_tampering(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture):
    from flows.cli import main

    monkeypatch.setenv("LLMHOST_STORE_URL", f"sqlite:///{tmp_path / 'cli.db'}")
    monkeypatch.setenv("COLUMNS", "250")  # a wide terminal, so rich does not fold table cells
    monkeypatch.delenv("LLMHOST_RAISE_ERRORS", raising=False)
    assert main(["keys", "create", "--user", "erin", "--team", "ops"]) == 0
    raw = capsys.readouterr().out.strip()
    assert raw.startswith("llmh-")
    assert main(["keys", "list"]) == 0
    out = capsys.readouterr().out
    assert "erin" in out and store.split_key(raw)[0] in out and raw.split("-", 2)[2] not in out
    assert main(["audit", "verify"]) == 0
    assert "OK" in capsys.readouterr().out
    con = sqlite3.connect(tmp_path / "cli.db")
    con.execute("UPDATE audit_log SET subject = 'key:00000000' WHERE seq = 1")
    con.commit()
    assert main(["audit", "verify"]) == 1
    assert "BROKEN at seq 1" in capsys.readouterr().err


def test_secrets_are_scrubbed_from_audit_entries(engine: Engine):
    raw = store.create_key("fay", engine=engine).raw
    e = audit.record("admin", "oops", f"pasted {raw}", None, {"api_key": raw, "note": f"key {raw}"},
                     engine=engine)
    secret = raw.split("-", 2)[2]
    assert secret not in e.subject and secret not in (e.after or "")
    assert "[redacted]" in e.after and store.split_key(raw)[0] in e.subject


def test_concurrent_appends_keep_the_chain(engine: Engine):
    def work(i: int) -> None:
        for j in range(10):
            audit.record(f"worker{i}", "test.append", f"item:{i}-{j}", engine=engine)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result = audit.verify(engine=engine)
    assert result.ok and result.entries == 40, result.summary()


# ------------------------------------------------------------------------------------------------ deploy lease


@contextmanager
def held_elsewhere(endpoint: str, actor: str, engine: Engine | None = None) -> Iterator[None]:
    """Another deploy holding `endpoint`'s lease (another process in production; a thread here, since the
    lease is re-entrant per thread) for the duration of the block."""
    holding, release = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def other_deploy() -> None:
        try:
            with store.deploy_lease(endpoint, actor=actor, engine=engine):
                holding.set()
                release.wait(30)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    t = threading.Thread(target=other_deploy)
    t.start()
    try:
        assert holding.wait(10), errors
        yield
    finally:
        release.set()
        t.join(10)
    assert not errors


def test_a_second_deploy_of_an_endpoint_is_refused_while_one_runs(engine: Engine):
    with held_elsewhere("ep", "nightly-retrain", engine):
        refused = pytest.raises(store.DeployInProgress, match=r"'ep' is being deployed by nightly-retrain \(pid \d+")
        with refused, store.deploy_lease("ep", actor="alice", engine=engine):
            pass
        with store.deploy_lease("other-ep", actor="alice", engine=engine):  # other endpoints are free
            pass
    with store.deploy_lease("ep", actor="alice", engine=engine) as lease:  # released when the first ended
        assert lease.holder == "alice"


def test_the_lease_is_released_on_failure_and_reentrant_in_a_thread(engine: Engine):
    with (pytest.raises(RuntimeError, match="boom"), store.deploy_lease("ep", actor="a", engine=engine),
          store.deploy_lease("ep", actor="a", engine=engine)):  # rollback -> deploy
        raise RuntimeError("boom")
    with store.deploy_lease("ep", actor="b", engine=engine) as lease:
        assert lease.holder == "b"


def test_a_lease_left_by_a_dead_or_expired_deploy_is_taken_over(engine: Engine):
    import socket
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    now = store.utcnow()
    with store.session_scope(engine) as s:
        s.add(store.DeployLease(endpoint="crashed", holder="bob", host=socket.gethostname(),
                                pid=int(dead.stdout), acquired_at=now, expires_at=now + timedelta(hours=1)))
        s.add(store.DeployLease(endpoint="expired", holder="carol", host="another-host", pid=1,
                                acquired_at=now - timedelta(hours=2), expires_at=now - timedelta(hours=1)))
        s.add(store.DeployLease(endpoint="elsewhere", holder="dan", host="another-host", pid=1,
                                acquired_at=now, expires_at=now + timedelta(hours=1)))
    for ep in ("crashed", "expired"):
        with store.deploy_lease(ep, actor="alice", engine=engine) as lease:
            assert lease.holder == "alice"
    held = pytest.raises(store.DeployInProgress, match="dan .*another-host")  # alive as far as we can tell
    with held, store.deploy_lease("elsewhere", actor="alice", engine=engine):
        pass


def test_cli_deploy_refused_by_the_lease_creates_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    import yaml

    from flows.cli import main
    from tasks.core.settings import PROJECT_ROOT

    raw = yaml.safe_load((PROJECT_ROOT / "deployments" / "demo.yaml").read_text())
    spec = tmp_path / "lease-demo.yaml"
    spec.write_text(yaml.safe_dump({**raw, "name": "lease-demo"}))
    audit_before = audit.count()
    with held_elsewhere("lease-demo", "nightly-retrain"):
        assert main(["deploy", str(spec)]) != 0
    err = capsys.readouterr().err.strip()
    assert "being deployed by nightly-retrain" in " ".join(err.split()), err
    assert "lease-demo" not in {e.name for e in store.list_endpoints()}
    assert audit.count() == audit_before


def test_adapter_loads_are_refused_while_the_endpoint_is_being_deployed():
    from tasks.deploy import adapters

    with held_elsewhere("lease-adapters", "alice"):
        with pytest.raises(store.DeployInProgress, match="being deployed by alice"):
            adapters.load_into_endpoint("lease-adapters", "models:/demo/2")
        with pytest.raises(store.DeployInProgress, match="being deployed by alice"):
            adapters.unload_from_endpoint("lease-adapters", "demo-v2")


def test_endpoints_stop_is_refused_while_the_endpoint_is_being_deployed(capsys: pytest.CaptureFixture[str]):
    """`llmhost endpoints stop` takes the deploy lease: it names the holder and changes nothing."""
    from flows.cli import main

    store.upsert_endpoint("lease-stop", actor="admin")
    rev = store.add_revision("lease-stop", {"model": "m"}, served_model_name="lease-stop")
    rep = store.add_replica("lease-stop", rev.id, base_url="http://127.0.0.1:9301", served_model_name="lease-stop",
                            state="up", managed=False)
    audit_before = audit.count()
    with held_elsewhere("lease-stop", "nightly-retrain"):
        assert main(["endpoints", "stop", "lease-stop"]) != 0
    err = " ".join(capsys.readouterr().err.split())
    assert "being deployed by nightly-retrain" in err, err
    assert store.get_endpoint("lease-stop").status != "stopped"
    assert [r.state for r in store.list_replicas("lease-stop", rev.id)] == ["up"] and rep.id
    assert audit.count() == audit_before
    assert main(["endpoints", "stop", "lease-stop"]) == 0  # once the deploy is over, the stop goes through
    assert store.get_endpoint("lease-stop").status == "stopped"

