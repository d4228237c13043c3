"""The benchmark results store (transactional, safe for concurrent writers) and the reports
rendered from it (Markdown, PNG plots, a self-contained HTML page checked in headless Chromium)."""

from __future__ import annotations

import math
import multiprocessing
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from PIL import Image

from helpers import run_command
from ssl_kit.bench.report import summarize, write_report
from ssl_kit.bench.report.summary import gain_label, gain_text
from ssl_kit.bench.store import Result, ResultStore

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
# (method, backbone, base accuracy): random init exists for resnet18 only, so mae has no gain.
METHODS = (("simclr", "resnet18", 0.60), ("byol", "resnet18", 0.70), ("mae", "vit_tiny", 0.80), ("Random init", "resnet18", 0.55))
DATASETS = ("digits", "fsdd")
PROTOCOLS = ("linear", "knn")
# Per seed: mean + offset x spread, so the mean is the base (not the median) and the sample std
# is sqrt((1 + 1 + 4) / 2) = sqrt(3) spreads (the population std would be sqrt(2)).
OFFSETS = (-1, -1, 2)


def git_head() -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parents[1], capture_output=True, text=True, check=True).stdout.strip()


def result(suite: str = "s", cell: str = "c", **fields) -> Result:
    defaults = dict(method="simclr", dataset="digits", backbone="resnet18", protocol="linear", metric="top1", value=0.5, seed=0, config={}, wall_time_s=1.0)
    return Result(suite=suite, cell=cell, **{**defaults, **fields})


def test_round_trip_fills_provenance(tmp_path):
    store = ResultStore(tmp_path / "nested" / "results.sqlite")
    config = {"model": {"class_path": "ssl_kit.methods.SimCLR", "init_args": {"lr": 0.1}}, "seed": 3}
    given = result(value=0.93, seed=3, config=config, wall_time_s=12.5, throughput=410.0, epochs=2.0)
    store.add([given, result(metric="top5", value=math.nan)])

    first, second = store.rows()
    provenance = ("versions", "git_commit", "hardware", "created_at")
    assert {k: v for k, v in first.items() if k not in provenance} == {k: v for k, v in vars(given).items() if k not in provenance}
    assert math.isnan(second["value"]) and second["throughput"] is None  # NaN (a diverged run) survives
    assert {"python", "torch", "torchvision", "torchaudio", "lightning", "timm", "lightly", "torchmetrics", "ssl_kit"} <= set(first["versions"])
    assert first["versions"]["ssl_kit"] == "0.1.0"
    assert first["git_commit"].removesuffix("-dirty") == git_head()
    assert re.fullmatch(r"\d+ x .+", first["hardware"])  # "2 x CPU (model), 24 GiB" or "1 x NVIDIA H100 ..."
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", first["created_at"])
    assert first["created_at"] == second["created_at"]  # one cell, one timestamp
    assert ResultStore(store.path).rows("s") == store.rows()  # reopening keeps the rows
    assert store.rows("other") == []


def test_failed_add_leaves_no_partial_rows(tmp_path):
    store = ResultStore(tmp_path / "results.sqlite")
    store.add([result(cell="done")])
    with pytest.raises(TypeError, match="not JSON serializable"):
        # The second row's config fails to encode after the first row was inserted.
        store.add([result(cell="broken"), result(cell="broken", config={"x": object()}), result(cell="broken")])
    assert [row["cell"] for row in store.rows()] == ["done"]
    assert store.finished_cells("s") == {"done"}


def test_finished_cells(tmp_path):
    store = ResultStore(tmp_path / "results.sqlite")
    assert store.finished_cells("a") == set()
    store.add([result("a", "cell-1"), result("a", "cell-1", metric="top5")])
    store.add([result("a", "cell-2")])
    store.add([result("b", "cell-3")])
    assert store.finished_cells("a") == {"cell-1", "cell-2"}
    assert store.finished_cells("b") == {"cell-3"}


def write_cells(path: Path, suite: str, cells: int, start: multiprocessing.synchronize.Barrier) -> None:
    """One suite's writer: opens the store and writes each cell's 3 rows in its own transaction.
    The pause between cells (a real suite's is the cell's training) leaves the lock free for the
    other writer, whose busy handler polls; without it one writer can hold the other off to its end."""
    start.wait()
    store = ResultStore(path)
    for i in range(cells):
        store.add([result(suite, f"cell-{i}", metric=metric, value=i / cells, hardware="test machine") for metric in ("top1", "top5", "loss")])
        time.sleep(0.005)


@pytest.mark.slow
def test_concurrent_writers_lose_no_rows(tmp_path):
    path, cells = tmp_path / "results.sqlite", 200
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(2)  # both create the store and write at the same moment
    writers = [context.Process(target=write_cells, args=(path, suite, cells, start)) for suite in ("suite-a", "suite-b")]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=120)
        assert writer.exitcode == 0

    rows = ResultStore(path).rows()
    assert len(rows) == 2 * cells * 3
    assert len({(row["suite"], row["cell"], row["metric"]) for row in rows}) == 2 * cells * 3
    for suite in ("suite-a", "suite-b"):
        assert ResultStore(path).finished_cells(suite) == {f"cell-{i}" for i in range(cells)}
    # The writes really overlapped: in insertion order the suites alternate, and never inside a cell.
    suites = [row["suite"] for row in rows]
    switches = [i for i in range(1, len(suites)) if suites[i] != suites[i - 1]]
    assert len(switches) > 2, "the two writers ran one after the other; the test did not exercise concurrency"
    assert all(i % 3 == 0 for i in switches)


def percent(mean: float, std: float) -> str:
    return f"{mean:.1f} ± {std:.1f}"


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict[str, Path]:
    """A store of 4 methods x 2 datasets x 2 protocols x 3 seeds with known values, and its report.
    Accuracy = base + 0.05 dataset + 0.02 protocol, spread 0.01 (method + 1)."""
    root = tmp_path_factory.mktemp("report")
    store = ResultStore(root / "results.sqlite")
    for m, (method, backbone, base) in enumerate(METHODS):
        for d, dataset in enumerate(DATASETS):
            for p, protocol in enumerate(PROTOCOLS):
                for seed, offset in enumerate(OFFSETS):
                    value = base + 0.05 * d + 0.02 * p + offset * 0.01 * (m + 1)
                    cell = f"{method}-{dataset}-{protocol}-{seed}"
                    fields = dict(method=method, backbone=backbone, dataset=dataset, protocol=protocol, seed=seed, config={"seed": seed})
                    store.add([result("suite", cell, value=value, wall_time_s=100.0 * (m + 1) + seed, epochs=10.0 * (m + 1), throughput=50.0 * (m + 1), **fields)])
    return write_report(store.path, root / "report", suite="suite", description=DESCRIPTION)


def test_summarize_over_seeds():
    rows = [vars(result(seed=s, value=v, wall_time_s=w, epochs=None)) for s, v, w in ((0, 0.5, 10.0), (1, 0.7, 20.0))]
    (entry,) = summarize(rows)
    assert (entry["n"], entry["seeds"], entry["wall_time_s"], entry["epochs"]) == (2, [0, 1], 15.0, None)
    assert entry["mean"] == pytest.approx(0.6) and entry["std"] == pytest.approx(math.sqrt(0.02))
    assert summarize(rows[:1])[0]["std"] == 0.0


DESCRIPTION = "A test suite <on> two datasets.\n\nMade by `python -m ssl_kit.bench --config suite.yaml`."


def test_markdown_leaderboard(report):
    text = report["markdown"].read_text()
    assert text.startswith("# Benchmark leaderboard\n\n## At a glance\n\n- digits: above random init on every protocol")
    glance, digits, fsdd = text.split("## digits")[0], *text.split("## digits")[1].split("## fsdd")
    assert "byol (resnet18) +15.0, simclr (resnet18) +5.0; no random-init row to compare with: mae (vit_tiny)." in glance
    header = "| method (backbone) | linear top1 | knn top1 | budget |"
    # Ranked by the first protocol; spreads 0.01, 0.02, 0.03, 0.04 give sample stds 1.7, 3.5, 5.2, 6.9 %;
    # gains are over random init of the same backbone (55.0 and 57.0 on digits), the best cell is bold.
    assert [line for line in digits.splitlines() if line.startswith("| ")] == [
        header,
        "| mae (vit_tiny) | **80.0 ± 5.2**, no random-init row for this backbone | **82.0 ± 5.2**, no random-init row for this backbone | 5.0 min, 30 epochs |",
        "| byol (resnet18) | 70.0 ± 3.5, Δ +15.0 | 72.0 ± 3.5, Δ +15.0 | 3.4 min, 20 epochs |",
        "| simclr (resnet18) | 60.0 ± 1.7, Δ +5.0 | 62.0 ± 1.7, Δ +5.0 | 1.7 min, 10 epochs |",
        "| Random init (resnet18) | 55.0 ± 6.9 | 57.0 ± 6.9 | 6.7 min, 40 epochs |",
    ]
    assert "| simclr (resnet18) | 65.0 ± 1.7, Δ +5.0 | 67.0 ± 1.7, Δ +5.0 |" in fsdd and "![fsdd](fsdd.png)" in fsdd
    assert text.count("Mean ± std over 3 seeds") == 2 and "Δ: the gain over the random-init row of the same backbone" in text
    assert text.index("## fsdd") < text.index("## About this suite\n\n" + DESCRIPTION)
    assert "final checkpoint" in text and "never on the test set" in text
    assert git_head() in text and "- Suites: `suite`" in text and "torch 2." in text and "- Hardware: `" in text


def test_gain_is_mean_minus_random_init_of_the_same_backbone():
    rows = [
        vars(result(method=method, backbone=backbone, seed=seed, value=value))
        for method, backbone, values in (("Random init", "resnet18", (0.40, 0.44)), ("simclr", "resnet18", (0.51, 0.53)), ("mae", "vit", (0.7, 0.7)))
        for seed, value in enumerate(values)
    ]
    random_init, mae, simclr = summarize(rows)
    # seed by seed: 0.51 - 0.40 and 0.53 - 0.44, so 0.10 ± the sample std of 0.11 and 0.09
    assert simclr["gain"] == pytest.approx(0.10) and simclr["gain_std"] == pytest.approx(math.sqrt(2) * 0.01) and simclr["gain_seeds"] == [0, 1]
    assert (random_init["gain"], random_init["has_reference"], gain_text(random_init)) == (None, True, "")
    assert (mae["gain"], mae["has_reference"], gain_text(mae)) == (None, False, "no random-init row for this backbone")
    assert gain_text(simclr) == "+10.0" and gain_text({**simclr, "gain": -0.031}) == "−3.1"
    assert (gain_label(simclr), gain_label(mae)) == ("Δ +10.0", "no random-init row for this backbone")
    # a dataset without any random-init row (a self-training table): the pivots say nothing per cell
    (alone,) = summarize([vars(result(method="mae", backbone="vit", seed=0, value=0.7, dataset="other"))])
    assert (alone["dataset_has_reference"], gain_label(alone)) == (False, "")


def test_gain_pairs_seeds_with_the_reference():
    """A row run on fewer seeds than its reference is measured against the reference on those
    seeds only: a seed-0 row against the seed-0 reference, not against the three-seed mean."""
    rows = [
        vars(result(method=method, seed=seed, value=value))
        for method, values in (("Random init", {0: 0.30, 1: 0.40, 2: 0.50}), ("one seed", {0: 0.35}), ("seeds 1-2", {1: 0.50, 2: 0.54}), ("seed 5", {5: 0.9}))
        for seed, value in values.items()
    ]
    by_method = {entry["method"]: entry for entry in summarize(rows)}
    assert by_method["one seed"]["gain"] == pytest.approx(0.05) and by_method["one seed"]["gain_std"] == 0.0  # unpaired: -0.05
    assert by_method["seeds 1-2"]["gain"] == pytest.approx(0.07) and by_method["seeds 1-2"]["gain_std"] == pytest.approx(math.sqrt(2) * 0.03)
    assert by_method["seeds 1-2"]["gain_seeds"] == [1, 2]
    assert (by_method["seed 5"]["gain"], gain_text(by_method["seed 5"])) == (None, "no random-init row on the same seeds")
    # cross-validation rows pair by fold, a fold's value being the mean over its seeds
    folds = [
        vars(result(method=method, seed=seed, value=value, fold=fold))
        for method, values in (("Random init", {"0": (0.2, 0.4), "1": (0.5, 0.5)}), ("cv", {"0": (0.6, 0.6), "1": (0.6, 0.8)}))
        for fold, pair in values.items()
        for seed, value in enumerate(pair)
    ]
    cv = next(e for e in summarize(folds) if e["method"] == "cv")
    assert cv["gain_seeds"] == ["0", "1"] and cv["gain"] == pytest.approx((0.3 + 0.2) / 2)


def test_a_suite_reference_is_the_yardstick_of_its_gains_and_texts(tmp_path):
    """A self-training suite measures its rows against its own baseline (``reference: Supervised
    only``): the gains, the at-a-glance sentence, the footnote, the HTML header and the figure name
    it, and a random-init row is then one row among the others."""
    store = ResultStore(tmp_path / "store.sqlite")
    for method, protocol, values in (
        ("Supervised only", "few_label", (0.19, 0.21)), ("FixMatch", "few_label", (0.34, 0.36)),
        ("Random init", "few_label", (0.10, 0.10)), ("SimCLR", "knn", (0.52, 0.54)),
    ):  # fmt: skip
        for seed, value in enumerate(values):
            store.add([result("st", f"{method}-{seed}", method=method, protocol=protocol, seed=seed, value=value)])
    rows = store.rows("st")
    supervised, fixmatch, random_init, simclr = (
        next(e for e in summarize(rows, "Supervised only") if e["method"] == m) for m in ("Supervised only", "FixMatch", "Random init", "SimCLR")
    )
    assert fixmatch["gain"] == pytest.approx(0.15) and random_init["gain"] == pytest.approx(-0.10) and supervised["gain"] is None
    assert (gain_text(supervised), gain_text(simclr)) == ("", "no supervised-only row for this backbone")
    paths = write_report(store.path, tmp_path / "report", suite="st", reference="Supervised only")
    text = paths["markdown"].read_text()
    assert "above supervised only on every protocol (smallest gain, points): FixMatch (resnet18) +15.0" in text
    assert "at or below it on some protocol: Random init (resnet18) (few_label top1 −10.0); no supervised-only row to compare with: SimCLR (resnet18)." in text
    assert "Δ: the gain over the supervised-only row of the same backbone" in text
    assert "Gain over supervised only (points)" in paths["html"].read_text()
    # the default yardstick is still random init
    assert next(e for e in summarize(rows) if e["method"] == "FixMatch")["gain"] == pytest.approx(0.25)


def test_plots_are_png(report):
    for name in DATASETS:
        assert report[name].name == f"{name}.png"
        with Image.open(report[name]) as image:
            assert image.format == "PNG" and image.width > 300 and image.height > 200
            image.verify()


def test_html_is_self_contained(report):
    page = report["html"].read_text()
    flat = page.split('<table id="leaderboard">')[1].split("</table>")[0]
    assert flat.count("<tr>") == 1 + 4 * 2 * 2 and "Gain over random init" in flat
    assert page.count('<table class="pivot">') == 2 and page.count('src="data:image/png;base64,') == 2
    assert '<td class="num best">80.0 ± 5.2 <span class="gain none">no random-init row for this backbone</span></td>' in page
    assert '<td class="num">70.0 ± 3.5 <span class="gain up">Δ +15.0</span></td>' in page
    assert "http://" not in page and "https://" not in page and "<link" not in page
    assert "Provenance" in page and "suite" in page
    assert page.index("<h2>At a glance</h2>") < page.index('<table class="pivot">') < page.index("<h2>About this suite</h2>") < page.index('<table id="leaderboard">')
    assert "<p>A test suite &lt;on&gt; two datasets.</p><p>Made by `python -m ssl_kit.bench" in page


def test_committed_reports_render_without_warnings(tmp_path):
    """Every committed suite's store renders (pivots, figures) with warnings as errors."""
    import warnings

    import yaml

    benchmarks = Path(__file__).parents[2] / "benchmarks"
    suites = sorted([*benchmarks.glob("leaderboard*.yaml"), *benchmarks.glob("self_training*.yaml")])
    assert len(suites) >= 3
    for suite in suites:
        config = yaml.safe_load(suite.read_text())
        store = Path(__file__).parents[2] / config["store"]
        reference = config.get("reference", "Random init")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            paths = write_report(store, tmp_path / suite.stem, suite=config["name"], description=config["description"], reference=reference)
        assert f"{reference} (" in paths["markdown"].read_text() and len(paths) > 2


def test_report_errors_name_the_store(tmp_path, report):
    with pytest.raises(FileNotFoundError, match="missing.sqlite"):
        write_report(tmp_path / "missing.sqlite", tmp_path / "out")
    ResultStore(tmp_path / "empty.sqlite")
    with pytest.raises(ValueError, match="empty.sqlite has no results"):
        write_report(tmp_path / "empty.sqlite", tmp_path / "out")
    with pytest.raises(ValueError, match="results.sqlite has no results for suite 'other'"):
        write_report(report["html"].parents[1] / "results.sqlite", tmp_path / "out", suite="other")
    # a file that is not a store is named, and left as it was (no schema written into it)
    for name, content in (("notes.txt", b"my notes\n"), ("corrupt.sqlite", b"SQLite format 3\x00" + bytes(200))):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(ValueError, match=f"{name} is not a readable ssl_kit results store"):
            write_report(path, tmp_path / "out")
        assert path.read_bytes() == content


def browser() -> str | None:
    return next(filter(None, map(shutil.which, BROWSERS)), None)


def means(dom: str) -> list[float]:
    """The leaderboard's mean column (data-v of the first numeric cell of each body row)."""
    body = dom.split('<table id="leaderboard">')[1].split("<tbody>")[1].split("</tbody>")[0]
    return [float(v) for v in re.findall(r'<tr>(?:<td>[^<]*</td>)*<td class="num" data-v="([^"]+)"', body)]


def test_html_in_headless_chromium(report, tmp_path):
    """The page loads in a real browser, shows the pivots and the table, its script sorts the table
    (#sort=...), and a screenshot of its first screen shows the first pivot."""
    found = browser()
    if found is None:
        pytest.skip(f"no headless browser ({', '.join(BROWSERS)}) on PATH; install one, e.g. `apt-get install chromium`")
    url = report["html"].resolve().as_uri() + "#sort=mean:desc"
    command = [found, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}"]
    loaded = run_command([*command, "--dump-dom", url], timeout=60)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    dom = loaded.stdout
    shot = tmp_path / "first_screen.png"
    assert run_command([*command, f"--screenshot={shot}", "--window-size=1280,900", url], timeout=60).returncode == 0
    with Image.open(shot) as image:
        # Below the title and the at-a-glance list, the first pivot's header row (grey) is on screen.
        assert image.size == (1280, 900)
        greys = image.convert("RGB").getcolors(maxcolors=1 << 20)
        assert any(color == (0xF3, 0xF3, 0xF3) and count > 10_000 for count, color in greys)

    assert '<table id="leaderboard">' in dom and '<table class="pivot">' in dom and '<span class="gain up">Δ +15.0</span>' in dom
    assert percent(87.0, 5.2) in dom and percent(60.0, 1.7) in dom
    unsorted = means(report["html"].read_text())
    assert len(unsorted) == 16 and unsorted != sorted(unsorted, reverse=True)
    assert means(dom) == sorted(unsorted, reverse=True)  # the script ran and sorted by the hash
    assert re.search(r'<th data-key="mean" data-numeric="true" aria-sort="descending">', dom)


def test_claims_share_cells_out_and_a_dead_or_stale_holder_frees_its_cell(tmp_path, monkeypatch):
    """A claimed cell is refused to another owner while its holder lives; a holder whose process is
    gone (same host) or whose lease ran out frees it; a cell with rows is finished for everyone, and
    its rows are never written twice."""
    import os
    import socket
    import subprocess

    from ssl_kit.bench import store as store_module

    store = ResultStore(tmp_path / "results.sqlite")
    me = store_module.claim_owner()
    assert store.claim("s", "c1") is None and store.claim("s", "c1") is None  # re-entrant for its owner
    assert store.claim("s", "c1", owner="other:1") == me
    dead = subprocess.Popen(["true"])
    dead.wait()
    assert store.claim("s", "c2", owner=f"{socket.gethostname()}:{dead.pid}") is None
    assert store.claim("s", "c2") is None  # its holder's process is gone
    assert store.claim("s", "c3", owner="elsewhere:1") is None
    assert store.claim("s", "c3") == "elsewhere:1"
    monkeypatch.setattr(store_module.time, "time", lambda: 1e12)  # long after: the lease ran out
    assert store.claim("s", "c3") is None
    monkeypatch.undo()
    assert store.add([result("s", "c1")]) is True
    assert store.add([result("s", "c1", metric="top5")]) is False  # a second run's rows are refused
    assert [row["metric"] for row in store.rows("s")] == ["top1"]
    assert store.claim("s", "c1", owner="other:1") == "finished"
    store.release("s", "c3")
    assert store.claim("s", "c3", owner="other:1") is None
    assert os.getpid() == int(me.rpartition(":")[2])
