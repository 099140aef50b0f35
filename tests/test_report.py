"""The bench report from synthetic rows: CSV round trip, aggregation, markdown, PNG plots, one HTML page."""

import base64
import csv
import re

import pytest

from deltatune import report
from deltatune.errors import DataError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_rows(methods=("full", "lora", "bitfit"), seeds=(0, 1, 2)):
    rows = []
    trainable = {"full": 22_700_000, "lora": 73_728, "bitfit": 10_240}
    for seed in seeds:  # seed-major, as the bench runs them
        for i, method in enumerate(methods):
            summary = {"method": method, "task": "code-search", "model": "minilm", "metric": "ndcg@10",
                       "value": 0.5 + 0.1 * i + 0.01 * seed, "zero_shot_value": 0.42,
                       "trainable_params": trainable[method], "total_params": 22_713_216,
                       "train_seconds": 30.0 + seed, "step_seconds_median": 0.5 - 0.1 * i,
                       "peak_rss_mb": 900.0 + 10 * seed, "mrr": 0.4 + 0.01 * seed,
                       "history": [1, 2, 3]}  # not a scalar: stays out of the CSV
            rows.append(report.normalize_row(summary, seed=seed, max_steps=10))
    return rows


META = {"machine": {"cpu": "Test CPU @ 1GHz", "cores": 2, "ram_gb": 8.0, "os": "Linux"},
        "versions": {"python": "3.11.7", "torch": "2.13.0", "transformers": "5.23.0"},
        "date": "2026-01-01 12:00 UTC", "command": "deltatune bench --methods full,lora,bitfit",
        "max_steps": 10}


def test_normalize_row_keeps_scalars_and_adds_trainable_share():
    row = make_rows(seeds=(0,))[1]
    assert "history" not in row
    assert row["trainable_pct"] == pytest.approx(100 * 73_728 / 22_713_216)
    assert row["seed"] == 0 and row["max_steps"] == 10


def test_csv_round_trip_restores_types(tmp_path):
    rows = make_rows()
    path = report.write_csv(rows, tmp_path / "results.csv")
    with path.open() as f:
        header = next(csv.reader(f))
    assert header[:3] == ["method", "seed", "task"]
    assert "mrr" in header  # extra metrics follow the known columns
    back = report.read_csv(path)
    assert len(back) == len(rows)
    for a, b in zip(rows, back):
        assert b["trainable_params"] == a["trainable_params"] and isinstance(b["trainable_params"], int)
        assert b["value"] == pytest.approx(a["value"])
        assert b["method"] == a["method"]


def test_read_csv_missing_file_names_the_fix(tmp_path):
    with pytest.raises(DataError, match="deltatune bench"):
        report.read_csv(tmp_path / "results.csv")


def test_aggregate_mean_and_std_across_seeds():
    agg = {a["method"]: a for a in report.aggregate(make_rows())}
    assert list(agg) == ["zero-shot", "full", "lora", "bitfit"]  # zero-shot first, then bench order
    assert agg["lora"]["runs"] == 3
    assert agg["lora"]["value"] == pytest.approx(0.61)
    assert agg["lora"]["value_std"] == pytest.approx(0.01)  # sample std of .60, .61, .62
    assert agg["zero-shot"]["value"] == pytest.approx(0.42)
    assert agg["zero-shot"]["trainable_params"] == 0


def test_single_seed_has_no_spread():
    agg = report.aggregate(make_rows(seeds=(0,)))
    assert all(a["value_std"] is None for a in agg)
    assert "±" not in report.markdown(make_rows(seeds=(0,)))


def test_no_zero_shot_row_without_zero_shot_values():
    rows = [{**r, "zero_shot_value": None} for r in make_rows()]
    assert [a["method"] for a in report.aggregate(rows)] == ["full", "lora", "bitfit"]


def test_human_count():
    assert report.human_count(22_713_216) == "22.7M"
    assert report.human_count(73_728) == "73.7k"
    assert report.human_count(512) == "512"
    assert report.human_count(None) == "–"


def test_markdown_has_header_line_and_one_row_per_method():
    md = report.markdown(make_rows(), META)
    lines = md.splitlines()
    assert lines[0].startswith("Measured on Test CPU @ 1GHz (2 cores, 8.0 GB RAM)")
    assert "torch 2.13.0" in lines[0] and "transformers 5.23.0" in lines[0]
    table = [line for line in lines if line.startswith("|")]
    assert "ndcg@10" in table[0] and "trainable %" in table[0] and "peak RSS" in table[0]
    assert len(table) == 2 + 4  # header, rule, zero-shot + 3 methods
    assert re.search(r"\| lora \| 3 \| 0\.6100 ± 0\.0100 \| 73\.7k \|", md)


def test_write_report_writes_md_png_and_self_contained_html(tmp_path):
    rows = make_rows()
    paths = report.write_report(rows, tmp_path, META)
    for key in ("metric_plot", "time_plot"):
        assert paths[key].read_bytes()[:8] == PNG_MAGIC
    assert (tmp_path / "results.md").read_text() == report.markdown(rows, META)
    page = paths["html"].read_text()
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")
    assert "<table>" in page and "<td>lora</td>" in page and "0.6100 ± 0.0100" in page
    assert "Test CPU @ 1GHz" in page and "deltatune bench --methods full,lora,bitfit" in page
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(images) == 2
    assert base64.b64decode(images[0])[:8] == PNG_MAGIC
    assert "src='http" not in page and 'href="http' not in page  # nothing fetched from elsewhere


def test_write_report_escapes_html(tmp_path):
    rows = [{**r, "method": "<b>x</b>"} for r in make_rows(methods=("lora",), seeds=(0,))]
    page = report.write_report(rows, tmp_path, {})["html"].read_text()
    assert "<b>x</b>" not in page and "&lt;b&gt;x&lt;/b&gt;" in page


def test_write_report_without_rows_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no finished runs"):
        report.write_report([], tmp_path)


def test_machine_info_names_cpu_cores_ram_and_versions():
    info = report.machine_info()
    assert info["machine"]["cores"] >= 1
    assert info["machine"]["cpu"]
    assert info["versions"]["python"].count(".") == 2
    assert "torch" in info["versions"]


# ----------------------------------------------------------------------------- candidate pool, busy machine

def retrieval_rows(pool=656, loads=(0.02, 0.03, 0.04)):
    rows = make_rows(seeds=(0,))
    for r, load in zip(rows, loads):
        r.update(metric="mrr", pool=pool, pool_protocol="whole-split", other_load=load)
    return rows


def test_the_candidate_pool_is_named_beside_every_mrr(tmp_path):
    rows = retrieval_rows()
    md = report.markdown(rows, META)
    assert "| method | runs | mrr (candidate pool 656, whole-split) |" in md
    page = report.write_report(rows, tmp_path, META)["html"].read_text()
    assert "mrr (candidate pool 656, whole-split)" in page  # the table header and the plot's caption
    mixed = [{**r, "pool": 1000 if r["method"] == "lora" else 656} for r in rows]  # then in every cell
    lines = {line.split("|")[1].strip(): line for line in report.markdown(mixed).splitlines() if line.startswith("| ")}
    assert "(candidate pool 1000)" in lines["lora"] and "(candidate pool 656)" in lines["full"]
    assert "(candidate pool 656)" in lines["zero-shot"] and "(candidate pool 1000)" in lines["zero-shot"]


def test_a_run_timed_on_a_busy_machine_is_marked_not_trusted(tmp_path):
    quiet, noisy = retrieval_rows(), retrieval_rows(loads=(0.02, 0.45, 0.04))  # lora shared the machine
    md = report.markdown(noisy, META)
    lines = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}
    assert lines["lora"].count(report.BUSY_MARK) == 1 and report.BUSY_MARK not in lines["full"]
    assert "lora seed 0 (45%)" in md and "Not a measurement of the method" in md
    assert report.BUSY_MARK not in report.markdown(quiet, META).split("Times per step")[0]
    assert "at most 4%" in report.markdown(quiet, META)
    page = report.write_report(noisy, tmp_path, META)["html"].read_text()
    assert "lora seed 0 (45%)" in page and "hatched grey" in page
    # the plot draws the marked bar differently
    assert (report.plot_step_time(noisy, tmp_path / "a.png").read_bytes()
            != report.plot_step_time(quiet, tmp_path / "b.png").read_bytes())
    unmeasured = [{k: v for k, v in r.items() if k != "other_load"} for r in quiet]
    assert "not measured" in report.markdown(unmeasured)
    back = report.read_csv(report.write_csv(noisy, tmp_path / "results.csv"))
    assert [r["other_load"] for r in back] == [0.02, 0.45, 0.04] and back[0]["pool"] == 656
