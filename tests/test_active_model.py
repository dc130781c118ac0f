"""The project's active model: stored (schema v6), promoted through the API and the CLI, and
honoured where a run begins: a session created with ``initial_model: "active"`` starts from
that version's exact bytes, links to it in the lineage, and trains on from it.

Real parts: uvicorn serving the API over httpx, a serving controller (``ControllerService``)
on the embedded broker with simulated devices, and SQLite/PostgreSQL for the migration.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text
from typer.testing import CliRunner

from edgefl.auth.tokens import Role
from edgefl.cli.main import app as cli
from edgefl.controller.model_versions import ModelRepository
from edgefl.protocol.tensors import loads_tensors
from edgefl.store import make_store
from edgefl.store.base import ModelRecord, SessionRecord, Store
from edgefl.store.blobs import FileBlobStore
from edgefl.store.schema import META_TABLE, alembic_config
from edgefl.store.sql import SCHEMA_VERSION, SqlStore
from edgefl.tasks import digits
from tests.serving import Fleet, serving_fleet, wait_for

PROBLEM = "application/problem+json"
DEVICES = 3


@pytest.fixture(scope="module")
def fleet(embedded_broker, tmp_path_factory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("active")
    with serving_fleet(embedded_broker.url, root, DEVICES, regions=1) as f:
        yield f


def _model(store: Store, version: str) -> ModelRecord:
    found = store.get_model(version)
    assert found is not None, version
    return found


def _active(store: Store, project: str) -> str | None:
    settings = store.get_project(project)
    return settings.active_model if settings else None


def _run(ops: httpx.Client, viewer: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    """Create and start a session through the API and wait until it has ended."""
    made = ops.post("/api/sessions", json=body)
    assert made.status_code == 201, made.text
    sid = made.json()["session_id"]
    assert ops.post(f"/api/sessions/{sid}/start").status_code == 202

    def ended() -> dict[str, Any] | None:
        s = viewer.get(f"/api/sessions/{sid}").json()
        return s if s["status"] in ("completed", "failed", "stopped") else None

    done = wait_for(f"{sid} to end", ended, 90)
    assert done["status"] == "completed", done
    return dict(done)


def test_a_session_from_the_active_model_starts_from_its_exact_weights(fleet: Fleet) -> None:
    store, blobs = fleet.dep.store, FileBlobStore(fleet.dep.models_dir)
    project = fleet.dep.project
    base = {"rounds": 2, "min_devices": DEVICES, "round_timeout_s": 20, "train": {"lr": 0.1}}
    with fleet.http(Role.operator) as ops, fleet.http() as viewer:
        first = _run(ops, viewer, {**base, "session_id": "base-1"})
        # nothing promoted yet: "active" has nothing to start from
        none = ops.post("/api/sessions", json={**base, "initial_model": "active"})
        assert none.status_code == 409 and none.headers["content-type"] == PROBLEM
        assert "no active model" in none.json()["detail"]
        assert viewer.get(f"/api/projects/{project}").json()["active_model"] is None

        best = first["model_version"]
        path = f"/api/projects/{project}/active-model"
        denied = viewer.put(path, json={"version": best})
        assert denied.status_code == 403 and denied.headers["content-type"] == PROBLEM
        assert store.get_project(project) is None  # the viewer changed nothing
        promoted = ops.put(path, json={"version": best})
        assert promoted.status_code == 200, promoted.text
        assert promoted.json()["active_model"] == best
        assert promoted.json()["active_model_set_by"] == "ops (operator)"
        shown = viewer.get(f"/api/projects/{project}").json()
        assert shown["active_model"] == best and shown["active_model_set_at"] > 0
        listed = viewer.get("/api/sessions/base-1/models").json()
        assert [m["version"] for m in listed if m["active"]] == [best]
        assert sum(m["active"] for m in listed) == 1

        # a session created from it: round 0 is the active version's bytes, with it as parent
        made = ops.post(
            "/api/sessions", json={**base, "session_id": "next-1", "initial_model": "active"}
        )
        assert made.status_code == 201, made.text
        assert made.json()["config"]["train"]["model"] == "softmax"  # inherited
        [initial] = store.list_models("next-1")
        assert initial.round == 0 and initial.parent == best
        assert initial.version == made.json()["model_version"] != best
        assert blobs.get(initial.version) == blobs.get(best)
        assert initial.digest == _model(store, best).digest
        assert ops.post("/api/sessions/next-1/start").status_code == 202
        done = wait_for(
            "next-1 to end",
            lambda: (s := viewer.get("/api/sessions/next-1").json())["status"] == "completed" and s,
            90,
        )
        rounds = store.list_rounds("next-1")
        assert rounds[0].model_in == initial.version  # the devices trained from it
        # it trained on from the promoted weights, not from scratch: round 1 of the new
        # session is not the reference run's round 1 from the initial weights
        fresh = digits.reference_run(DEVICES, 1)[0]
        assert rounds[0].metrics["accuracy"] != pytest.approx(fresh, abs=1e-9)
        lineage = viewer.get(f"/api/sessions/next-1/models/{done['model_version']}/lineage")
        assert lineage.json()["complete"] is True
        # next-1's versions, then on through the promoted one to base-1's initial weights
        assert [m["version"] for m in lineage.json()["chain"]] == [
            *(m.version for m in reversed(store.list_models("next-1"))),
            *(m.version for m in reversed(store.list_models("base-1"))),
        ]
        assert store.list_models("base-1")[-1].version == best

        # a version id works as well; a model the tensors do not fit is refused
        by_id = ops.post(
            "/api/sessions", json={**base, "session_id": "by-id", "initial_model": best}
        )
        assert (
            by_id.status_code == 201 and _model(store, by_id.json()["model_version"]).parent == best
        )
        misfit = ops.post(
            "/api/sessions",
            json={**base, "session_id": "misfit", "model": "mlp", "initial_model": best},
        )
        assert misfit.status_code == 422 and "does not fit" in misfit.json()["detail"]
        ghost = ops.post(
            "/api/sessions",
            json={**base, "session_id": "ghost", "initial_model": "nope-r0001-00000000"},
        )
        assert ghost.status_code == 422


def test_activate_refuses_unknown_and_foreign_versions(fleet: Fleet) -> None:
    store, project = fleet.dep.store, fleet.dep.project
    store.create_session(SessionRecord("alien-1", "other", {}, "completed", 1, "", 1.0, 1.0))
    store.add_model(ModelRecord("alien-1-r0001-abcdef01", None, "alien-1", 1, "ab" * 32, 1, 1.0))
    before = store.get_project(project)
    path = f"/api/projects/{project}/active-model"
    with fleet.http(Role.operator) as ops:
        unknown = ops.put(path, json={"version": "no-such-r0001-00000000"})
        assert unknown.status_code == 404 and unknown.headers["content-type"] == PROBLEM
        foreign = ops.put(path, json={"version": "alien-1-r0001-abcdef01"})
        assert foreign.status_code == 409 and foreign.headers["content-type"] == PROBLEM
        assert "other" not in foreign.json()["detail"]  # another project is never named
        elsewhere = ops.put("/api/projects/other/active-model", json={"version": "x"})
        assert elsewhere.status_code == 404  # this API serves one project only
        from_other = ops.post(
            "/api/sessions", json={"rounds": 1, "initial_model": "alien-1-r0001-abcdef01"}
        )
        assert from_other.status_code == 409
    assert store.get_project(project) == before  # nothing changed
    assert store.get_project("other") is None


def test_cli_activates_marks_and_creates_from_the_active_model(fleet: Fleet) -> None:
    store = fleet.dep.store
    sid = "base-1"
    if store.get_session(sid) is None:  # run alone: make the session this test promotes
        with fleet.http(Role.operator) as ops, fleet.http() as viewer:
            _run(ops, viewer, {"session_id": sid, "rounds": 2, "min_devices": DEVICES})
    versions = [m.version for m in store.list_models(sid)]
    pick = versions[1]

    def run(*args: str, role: Role = Role.viewer) -> Any:
        env = {"EDGEFL_API": fleet.url, "EDGEFL_TOKEN": fleet.token(role), "COLUMNS": "250"}
        return CliRunner().invoke(cli, list(args), env=env)

    denied = run("models", "activate", pick)
    assert denied.exit_code == 1 and "403 Forbidden" in denied.output
    done = run("models", "activate", pick, role=Role.operator)
    assert done.exit_code == 0, done.output
    assert f"active model of project {fleet.dep.project}: {pick}" in done.output
    assert _active(store, fleet.dep.project) == pick
    listed = run("models", sid)
    assert listed.exit_code == 0 and f"* active model: {pick}" in listed.output
    line = next(ln for ln in listed.output.splitlines() if pick in ln and "active model" not in ln)
    assert "*" in line
    made = run(
        "session", "create", "--id", "cli-next", "--rounds", "1", "--initial-model", "active",
        role=Role.operator,
    )  # fmt: skip
    assert made.exit_code == 0, made.output
    [initial] = store.list_models("cli-next")
    assert initial.parent == pick and f"round 0 is {initial.version}" in made.output
    repo = ModelRepository(store, FileBlobStore(fleet.dep.models_dir))
    got, _ = repo.load(initial.version)
    want = loads_tensors(FileBlobStore(fleet.dep.models_dir).get(pick))
    assert got.keys() == want.keys() and all((got[k] == want[k]).all() for k in want)


# the migration ----------------------------------------------------------------------------
BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(params=BACKENDS, ids=BACKENDS)
def url(request: pytest.FixtureRequest, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    return str(request.getfixturevalue("postgres_url"))


def test_migration_0002_to_0003_keeps_the_data_and_adds_projects(url: str) -> None:
    """A database at revision 0002 (schema 5) gains the projects table and keeps every row;
    the active model can then be set, checked against the sessions it already had."""
    from alembic import command

    engine = create_engine(url)
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), "0002")
        conn.execute(
            text(
                "INSERT INTO sessions (session_id, project, config, status, current_round, "
                "model_version, created, updated) VALUES ('old', 'p', '{\"rounds\": 2}', "
                "'completed', 2, 'old-r0002', 1.0, 2.0)"
            )
        )
        conn.execute(
            text(
                "INSERT INTO models VALUES ('old-r0002', 'old-r0001', 'old', 2, 'ab', 3000000000,"
                " 2.0, '{}')"
            )
        )
        conn.execute(
            text(
                "INSERT INTO devices VALUES ('p', 'd1', 'r0', 'online', 5.0, '{}', '', "
                "'{\"cpu_percent\": 3.5}', 5.0, 1, 0, 0)"
            )
        )
    with engine.connect() as conn:
        assert conn.execute(text(f"SELECT value FROM {META_TABLE}")).scalar() == "5"
    engine.dispose()
    store = make_store(url)
    assert isinstance(store, SqlStore)
    try:
        # upgraded to the head (later revisions may follow 0003; the data must survive them too)
        assert store.schema.revision >= "0003"
        assert store.schema.schema_version == SCHEMA_VERSION >= 6
        sess = store.get_session("old")
        assert sess is not None and (sess.status, sess.model_version) == ("completed", "old-r0002")
        assert _model(store, "old-r0002").size == 3_000_000_000
        [dev] = store.list_devices("p")
        assert (dev.device, dev.telemetry) == ("d1", {"cpu_percent": 3.5})
        assert store.get_project("p") is None  # no settings yet: nothing is made up
        with pytest.raises(KeyError):
            store.set_active_model("p", "missing")
        with pytest.raises(ValueError, match="not project 'q'"):
            store.set_active_model("q", "old-r0002")
        rec = store.set_active_model("p", "old-r0002", "ann (operator)")
        assert (rec.active_model, rec.active_set_by) == ("old-r0002", "ann (operator)")
        assert _active(store, "p") == "old-r0002"
        cleared = store.set_active_model("p", None)
        assert cleared.active_model is None and cleared.active_set_at is None
    finally:
        store.close()
    engine = create_engine(url)
    with engine.connect() as conn:
        assert conn.execute(text(f"SELECT value FROM {META_TABLE}")).scalar() == str(SCHEMA_VERSION)
        assert conn.execute(text("SELECT count(*) FROM projects")).scalar() == 1
    engine.dispose()
