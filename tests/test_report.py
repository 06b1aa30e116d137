"""`python -m sim.report`: the page of a small sweep, checked as text and rendered in a real headless
Chromium (every figure drew, no script errors); `sim.replay --chrome-trace`."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sim.report import main as report_main
from sim.report import pareto_front, render, short_spec, trace_facts
from sim.sweep import load_sweep, read_results, run_sweep
from traces.stats import trace_stats
from traces.synthetic import iid_calls, toy_model, write_trace, zipf_probs

ROOT = Path(__file__).resolve().parent.parent
N_FIGURES = 7  # hit rate, TPOT, speedup, Pareto, link, popularity, timeline
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _trace(path: Path, seed: int) -> Path:
    model = toy_model(num_layers=4, num_experts=8, top_k=2, expert_bytes=200_000_000)
    write_trace(path, model, iid_calls(zipf_probs(8, 0.9), 400, num_layers=4, top_k=2, seed=seed))
    return path


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("report")
    _trace(d / "a.jsonl", 1)
    _trace(d / "b.jsonl.gz", 2)
    (d / "s.toml").write_text(
        'traces = ["a.jsonl", "b.jsonl.gz"]\npolicies = ["lru", "lfu(decay=0.9)", "fifo"]\n'
        'hardware = ["rtx4090", "a100-pcie"]\ncache = {per_layer = [2, 3, 4, 6], experts = [12], partition = "global"}\n'
    )
    run_sweep(load_sweep(d / "s.toml"), d / "out", jobs=1)
    return d / "out"


@pytest.fixture(scope="module")
def page(results: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("page") / "report.html"
    assert report_main([str(results), "-o", str(out)]) == 0
    return out


def test_page_is_self_contained_with_one_div_per_figure(page: Path) -> None:
    text = page.read_text()
    assert text.count('class="plotly-graph-div"') == N_FIGURES
    for sid in ("hit-rate", "tpot", "speedup", "pareto", "link", "popularity", "timeline"):
        assert f'id="fig-{sid}"' in text
    assert not re.search(r"<script[^>]+src=", text)  # nothing to fetch
    from plotly.offline import get_plotlyjs

    assert text.count(get_plotlyjs()[:200]) == 1  # plotly.js inlined once
    assert "cdn." not in text.split("<script>", 1)[0]
    assert "Every point has zero dropped mass" in text  # all shipped policies are lossless
    assert "Belady's optimum was replayed for this page" in text  # the sweep has no belady
    assert "compulsory-miss bound" in text


def test_render_is_deterministic(results: Path) -> None:
    assert render(results)[0] == render(results)[0]


def test_compulsory_bound_matches_trace_stats(results: Path) -> None:
    row = read_results(results)[0]
    f = trace_facts(row["trace_path"], row["trace"], row["trace_sha256"])
    s = trace_stats(row["trace_path"])["reuse"]
    assert f.accesses == s["accesses"] == row["accesses"]
    assert f.compulsory_bound == pytest.approx(1 - s["compulsory"] / s["accesses"])
    # no row beats it
    assert all(r["hit_rate"] <= f.compulsory_bound + 1e-12 for r in read_results(results) if r["trace"] == row["trace"])


def test_default_timeline_point_is_the_median_lru_size(results: Path) -> None:
    from sim.report import Report

    rep = Report(read_results(results), results)
    p = rep.pick_timeline_point(None)
    lru = sorted(r["cache_slots"] for r in rep.rows_of(rep.traces[0], rep.hardware[0]) if r["policy"] == "lru")
    assert p["policy"] == "lru" and p["cache_slots"] == lru[(len(lru) - 1) // 2]
    assert rep.pick_timeline_point(p["config_hash"][:10])["config_hash"] == p["config_hash"]


def test_cli_errors(results: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert report_main([str(tmp_path / "none"), "-o", str(tmp_path / "r.html")]) == 2
    assert report_main([str(results), "-o", str(tmp_path / "r.html"), "--timeline-point", "zzzz"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "no results" in err[0] and "no point" in err[1] and "zzzz" in err[1]
    assert not (tmp_path / "r.html").exists()


def test_pareto_front_and_short_spec() -> None:
    pts = [(3.0, 0.0, "a"), (1.0, 0.5, "b"), (2.0, 0.2, "c"), (2.5, 0.3, "d"), (1.0, 0.6, "e")]
    assert [p[2] for p in pareto_front(pts)] == ["b", "c", "a"]
    assert short_spec("lfu(decay=1.0)") == "lfu" and short_spec("lfu(decay=0.9)") == "lfu(decay=0.9)"
    assert short_spec("static(trace=None, scratch=None)") == "static"


# -- in a real browser ------------------------------------------------------------------------------
# Before plotly runs, a small script records script errors and console.error calls; after the load
# event it writes them into the page, where --dump-dom shows them.
_PROBE = """<script>
window.__errors = [];
window.addEventListener('error', function (e) { window.__errors.push('error: ' + e.message); });
(function () { var ce = console.error; console.error = function () {
  window.__errors.push('console.error: ' + Array.prototype.join.call(arguments, ' ')); ce.apply(console, arguments); }; })();
window.addEventListener('load', function () { setTimeout(function () {
  var p = document.createElement('pre'); p.id = 'probe-errors'; p.textContent = JSON.stringify(window.__errors);
  document.body.appendChild(p); }, 500); });
</script>"""


def _chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp / 'chromium-profile'}", "--enable-logging=stderr", "--v=0", *args],
        capture_output=True, text=True, timeout=180,
    )


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_every_figure_draws_in_headless_chromium(page: Path, tmp_path: Path) -> None:
    probed = tmp_path / "probed.html"
    probed.write_text(page.read_text().replace("<head>", "<head>" + _PROBE, 1))
    r = _chromium(tmp_path, "--virtual-time-budget=15000", "--window-size=1400,4000", "--dump-dom", probed.as_uri())
    assert r.returncode == 0, r.stderr[-2000:]
    dom = r.stdout
    # one plot element per figure, each with drawn SVG
    assert dom.count('class="plot-container plotly"') == N_FIGURES
    assert len(re.findall(r'<div [^>]*class="[^"]*\bjs-plotly-plot\b', dom)) == N_FIGURES
    parts = re.split(r'<div id="fig-[a-z-]+" class="plotly-graph-div js-plotly-plot"', dom)
    assert len(parts) == N_FIGURES + 1
    for part in parts[1:]:
        head = part[:200_000]
        assert '<svg class="main-svg"' in head
        assert re.search(r'class="(scatterlayer|barlayer|heatmaplayer|imagelayer)', head) or "<image" in head
    # bars of the Gantt chart, cells of the heatmaps, markers of the lines
    assert dom.count('class="point"') > 100
    errors = re.search(r'<pre id="probe-errors">(.*?)</pre>', dom, re.S)
    assert errors is not None, "the probe did not run"
    assert json.loads(errors.group(1).replace("&quot;", '"')) == []
    console = [ln for ln in r.stderr.splitlines() if "CONSOLE" in ln or "Uncaught" in ln]
    assert not console, console
    # and a screenshot: something of the size of a page was painted
    shot = tmp_path / "report.png"
    r = _chromium(tmp_path, "--virtual-time-budget=15000", "--window-size=1400,4000", "--hide-scrollbars",
                  f"--screenshot={shot}", page.as_uri())
    assert r.returncode == 0 and shot.stat().st_size > 50_000
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- Chrome / Perfetto trace events -----------------------------------------------------------------
def test_replay_chrome_trace(tmp_path: Path) -> None:
    t = _trace(tmp_path / "t.jsonl", 3)
    out = tmp_path / "trace.json"
    r = subprocess.run(
        [sys.executable, "-m", "sim.replay", str(t), "--cache-per-layer", "3", "--hardware", "rtx4090",
         "--chrome-trace", str(out), "--timeline-from", "5", "--timeline-steps", "3", "--no-progress"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert f"wrote {out}" in r.stdout
    doc = json.loads(out.read_text())
    ev = doc["traceEvents"]
    names = {e["tid"]: e["args"]["name"] for e in ev if e["ph"] == "M" and e["name"] == "thread_name"}
    assert set(names.values()) == {"steps", "gpu", "h2d0"}
    complete = [e for e in ev if e["ph"] == "X"]
    assert complete and all(e["dur"] > 0 and e["ts"] >= 0 and e["pid"] == 1 and e["tid"] in names for e in complete)
    steps = [e for e in complete if e["cat"] == "step"]
    assert [e["args"]["step"] for e in steps] == [5, 6, 7]
    assert [e["name"] for e in ev if e["ph"] == "i"] == ["step 5", "step 6", "step 7"]
    # the intervals lie inside their steps, in microseconds
    span = {e["args"]["step"]: (e["ts"], e["ts"] + e["dur"]) for e in steps}
    for e in complete:
        if e["cat"] in ("dense", "expert"):
            lo, hi = span[e["args"]["step"]]
            assert lo - 1e-3 <= e["ts"] and e["ts"] + e["dur"] <= hi + 1e-3
    assert {e["cat"] for e in complete} >= {"step", "dense", "expert", "load"}
    # the same as the timeline the Gantt chart draws
    from lab.cache import CacheConfig
    from sim.engine import Timeline
    from sim.replay import replay
    from sim.timeline import chrome_trace

    tl = Timeline(3, 5)
    replay(t, "lru", CacheConfig(per_layer=3), "rtx4090", timeline=tl)
    assert chrome_trace(tl, "lru on t.jsonl") == doc
    gpu = [e for e in complete if names[e["tid"]] == "gpu"]
    assert len(gpu) == len([iv for iv in tl.intervals if iv.lane == "gpu"])
    assert gpu[0]["dur"] == pytest.approx((tl.intervals[0].end - tl.intervals[0].start) * 1e6, abs=1e-3)
