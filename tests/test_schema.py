"""The one schema of results (`benchmark/record/schema.py`): documented field by field and tag by
tag, and followed by both the writer (`benchmark.record.tracking`) and the reader (`reports.load`)
on a real MLflow SQLite store."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
from conftest import smoke_cfg

from benchmark.record import schema, tracking
from benchmark.training.train import CellOptions, train_cell

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "mlflow-schema.md"
SUBS = ["exit1", "exit2", "exit3"]


def _doc_table() -> dict[str, tuple[str, str, str]]:
    """field -> (parent run, child run, csv column) from the doc's per-sub-model table."""
    rows = {}
    for line in DOC.read_text().splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and line.startswith("| `"):
            rows[cells[0]] = (cells[1], cells[2], cells[3])
    return rows


def _placeholders(pattern: str) -> str:
    """`{split}/top1/{sub}` -> `<split>/top1/<sub>`, as the doc writes patterns."""
    return re.sub(r"\{(\w+)\}", r"<\1>", pattern)


def test_every_submodel_field_is_documented_exactly():
    table = _doc_table()
    expected = {
        f.name: (_placeholders(f.parent) if f.parent else "—", f.child, f.csv)
        for f in schema.SUBMODEL_FIELDS
    }
    assert set(table) == set(expected), "docs/mlflow-schema.md's per-sub-model table is stale"
    for name, row in expected.items():
        assert table[name] == row, name


def test_every_tag_and_summary_key_is_documented():
    text = DOC.read_text()
    assert len(schema.TAGS) >= 30 and schema.CELL in schema.TAGS and schema.KIND in schema.TAGS
    for tag in schema.TAGS:
        shown = re.escape(_placeholders(tag))
        assert re.search(rf"`{shown}[`=]", text), f"{tag} is not in docs/mlflow-schema.md"
    for key in (schema.TOP1_MEAN, schema.TOP1_AUC):
        assert f"`{key.format(split='test')}`" in text, key
    assert f"`{schema.BESTVAL_EPOCH}`" in text


def test_no_tag_name_is_spelled_outside_the_schema():
    """Code names tags through benchmark.record.schema, never as literals a rename would miss."""
    literal = re.compile(r"""["']flexbench\.[a-z_]""")
    offenders = [
        f"{p.relative_to(ROOT)}:{i}"
        for folder in ("benchmark", "studies", "reports", "mlflow_server")
        for p in sorted((ROOT / folder).rglob("*.py"))
        if p.name != "schema.py" or p.parent.name != "record"
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if literal.search(line)
    ]
    assert offenders == []


def _rows() -> list[dict[str, object]]:
    """Distinct values for every field of every sub-model (so no two can be confused)."""
    rows = []
    for i, sub in enumerate(SUBS):
        row: dict[str, object] = {"index": i, "name": sub}
        for j, f in enumerate(schema.metric_fields()):
            row[f.name] = 10.0 * (j + 1) + i + 0.25
        rows.append(row)
    return rows


def test_parent_and_child_metrics_follow_the_table():
    rows = _rows()
    got = schema.parent_metrics(rows, "val")
    assert got["val/top1/exit2"] == rows[1]["top1"] and got["mflops/exit3"] == rows[2]["mflops"]
    assert len(got) == len(SUBS) * len(schema.metric_fields())
    rows[0]["gbitops"] = None  # a value the trainer could not measure is left out, not 0
    assert "gbitops/exit1" not in schema.parent_metrics(rows, "test")
    assert "gbitops" not in schema.child_metrics(rows[0])
    assert schema.child_tags(rows[2]) == {
        schema.SUBMODEL: "exit3",
        schema.SUBMODEL_INDEX: "2",
        schema.SPECTRUM: "false",  # a row without the flag is a fixed sub-model
    }
    spectrum_row = {**rows[2], "name": "spectrum/w0.30", "spectrum": "true"}
    assert schema.child_tags(spectrum_row)[schema.SPECTRUM] == "true"


def test_submodels_csv_has_the_table_columns(tmp_path):
    rows = _rows()
    rows[1]["latency_ms"] = None
    schema.write_submodels_csv(tmp_path / "submodels.csv", rows)
    with open(tmp_path / "submodels.csv", newline="") as fh:
        back = list(csv.DictReader(fh))
    assert list(back[0]) == schema.csv_columns() == [f.csv for f in schema.SUBMODEL_FIELDS]
    assert [r["name"] for r in back] == SUBS and back[1]["latency_ms"] == ""
    assert float(back[2]["top5"]) == rows[2]["top5"]


def test_every_field_written_by_tracking_is_read_by_reports_load(tracking_uri, client):
    """Round trip on a real store: CellRun.finish writes the schema, load_experiment reads every
    field back into its tidy table (a new field that either side drops fails here)."""
    from reports.load import load_experiment

    cfg = {
        "arch": {"name": "msdnet"},
        "data": {"name": "synthetic"},
        "method": {"name": "joint"},
        "seed": 4,
        "profile": "smoke",
    }
    rows = _rows()
    run = tracking.CellRun(tracking_uri, "roundtrip")
    run.start(cfg, "key0", {"seed": "4"}, {})
    run.finish(schema.parent_metrics(rows, "test"), rows, [], cfg, "key0", 1)

    exp = load_experiment("roundtrip", tracking_uri)
    assert exp.cells["status"].tolist() == ["finished"]
    tidy = exp.tidy.set_index("submodel")
    assert tidy.index.tolist() == SUBS
    for row in rows:
        got = tidy.loc[row["name"]]
        assert got["submodel_index"] == row["index"]
        for f in schema.metric_fields():
            assert got[f.name] == pytest.approx(row[f.name]), f.name
        assert (got["arch"], got["method"], got["seed"]) == ("msdnet", "joint", 4)

    children = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`{schema.SUBMODEL}` != ''"
    )
    assert len(children) == len(SUBS)
    for child in children:
        row = rows[int(child.data.tags[schema.SUBMODEL_INDEX])]
        assert child.data.tags[schema.SUBMODEL] == row["name"]
        assert child.data.metrics == schema.child_metrics(row)
        assert {t: child.data.tags[t] for t in schema.CELL_TAGS} == tracking.cell_tags(cfg, "key0")


def test_a_field_added_to_the_table_reaches_every_writer(
    tracking_uri, client, monkeypatch, tmp_path
):
    """A per-sub-model field is one row of SUBMODEL_FIELDS: a throw-away field (twice the MACs,
    read from the measurement by its source path) reaches the parent run's metrics, the child
    runs, `submodels.csv` and the width-spectrum rows of a real cell, with no other edit."""
    extra = schema.SubmodelField(
        "tmp_field", "tmp_field/{sub}", "tmp_field", "tmp_field", "", "throw-away", "cost.mmacs"
    )
    monkeypatch.setattr(schema, "SUBMODEL_FIELDS", (*schema.SUBMODEL_FIELDS, extra))
    cfg = smoke_cfg("us_mobilenet_v1", "joint", tmp_path)
    result = train_cell(cfg, CellOptions(tracking_uri=tracking_uri, progress=False))
    spectrum = [r for r in result.rows if r["spectrum"] == "true"]
    assert spectrum and all(r["tmp_field"] == r["mmacs"] for r in result.rows)
    parent = client.get_run(result.run_id).data.metrics
    for row in result.rows:  # fixed sub-models and spectrum points alike
        assert parent[f"tmp_field/{row['name']}"] == pytest.approx(row["mmacs"])
    children = client.search_runs(
        [client.get_run(result.run_id).info.experiment_id],
        f"tags.mlflow.parentRunId = '{result.run_id}'",
    )
    assert len(children) == len(result.rows)
    assert all(c.data.metrics["tmp_field"] == c.data.metrics["mmacs"] for c in children)
    local = client.download_artifacts(result.run_id, "submodels.csv", str(tmp_path))
    with open(local, newline="") as fh:
        back = list(csv.DictReader(fh))
    assert [float(r["tmp_field"]) for r in back] == [r["mmacs"] for r in result.rows]
