"""Policies from outside the repo: `--plugin MODULE`, sweep files' `plugins`, the entry-point group
`moe_offload_lab.policies`, in every process that builds policies (pool and Ray workers), and Policy
classes or instances in Python; bad plugins are one line naming them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lab.cache import CacheConfig
from policies import REGISTRY, DemandPolicy, PolicySpecError, register
from sim.replay import replay
from sim.sweep import SweepError, load_sweep, read_results, run_sweep

ROOT = Path(__file__).resolve().parent.parent
MIXTRAL = ROOT / "traces" / "mixtral-8x7b-gsm8k.jsonl.gz"
MRU = '''"""An MRU policy from outside the repo."""
from policies import DemandPolicy, register


@register({name!r})
class MRU(DemandPolicy):
    """Evict the most recently used expert outside the call."""

    def victim(self, cache, part, exclude):
        for k in reversed(cache.recency[part]):
            if k not in exclude:
                return k
        return None
'''


def _env(*paths: Path) -> dict[str, str]:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env["PYTHONPATH"] = os.pathsep.join([*(str(p) for p in paths), str(ROOT)])
    return env


def _run(args: list[str], env: dict[str, str] | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env or _env(), capture_output=True, text=True, timeout=600)


def _sweep(tmp: Path, policies: list[str], plugins: list[str] | None = None) -> Path:
    s = tmp / "s.toml"
    s.write_text(
        f'traces = ["{MIXTRAL}"]\npolicies = {json.dumps(policies)}\ncache = {{per_layer = [2, 4]}}\nhardware = ["rtx4090"]\n'
        + (f"plugins = {json.dumps(plugins)}\n" if plugins else "")
    )
    return s


def _ok_rows(out: Path) -> dict[str, int]:
    rows = read_results(out)
    assert all(r["status"] == "ok" for r in rows), [r.get("error") for r in rows]
    return {r["policy"]: r["misses"] for r in rows if r["cache_size"] == 4}


@pytest.fixture
def entry_point_site(tmp_path: Path) -> Path:
    """A package outside the repo declaring its policy as an entry point, as `pip install` leaves it:
    the module and a dist-info with entry_points.txt on the path (the class is registered by name)."""
    site = tmp_path / "site"
    (site / "mru_ep").mkdir(parents=True)
    (site / "mru_ep" / "__init__.py").write_text(MRU.replace("@register({name!r})\n", "").replace(", register", ""))
    info = site / "mru_ep-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mru-ep\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[moe_offload_lab.policies]\nmru-ep = mru_ep:MRU\n")
    return site


def test_plugin_module_in_replay_and_sweep_workers(tmp_path: Path) -> None:
    mod = tmp_path / "mods"
    mod.mkdir()
    (mod / "mru_mod.py").write_text(MRU.format(name="mru-mod"))
    r = _run(["sim.replay", str(MIXTRAL), "--policy", "mru-mod", "--cache-per-layer", "4", "--plugin", "mru_mod", "--no-progress"],
             _env(mod))
    assert r.returncode == 0, r.stderr
    assert "policy            mru-mod" in r.stdout
    misses = int(next(x for x in r.stdout.splitlines() if x.startswith("misses")).split()[1])
    # a sweep file's plugins (a file, relative to the sweep file), in a forkserver pool of 2 workers
    (tmp_path / "mru_file.py").write_text(MRU.format(name="mru-file"))
    out = tmp_path / "out"
    r = _run(["sim.sweep", str(_sweep(tmp_path, ["lru", "mru-file"], ["mru_file.py"])), "-o", str(out), "--jobs", "2", "--no-progress"])
    assert r.returncode == 0, r.stderr
    assert _ok_rows(out)["mru-file"] == misses
    # --plugin on the command line, and the module's folder known only to this process (cwd)
    out = tmp_path / "out2"
    r = _run(["sim.sweep", str(_sweep(tmp_path, ["mru-mod"])), "-o", str(out), "--jobs", "2", "--no-progress", "--plugin", "mru_mod"],
             cwd=mod)
    assert r.returncode == 0, r.stderr
    assert _ok_rows(out) == {"mru-mod": misses}
    rows = read_results(out)
    assert rows[0]["policy_name"] == "mru-mod"


def test_entry_point_policy_is_usable_by_name(tmp_path: Path, entry_point_site: Path) -> None:
    env = _env(entry_point_site)
    r = _run(["sim.replay", str(MIXTRAL), "--policy", "mru-ep", "--cache-per-layer", "4", "--no-progress"], env)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    r = _run(["sim.sweep", str(_sweep(tmp_path, ["lru", "mru-ep"])), "-o", str(out), "--jobs", "2", "--no-progress"], env)
    assert r.returncode == 0, r.stderr
    assert set(_ok_rows(out)) == {"lru", "mru-ep"}
    code = "from policies import names, available; print('mru-ep' in names(), available()['mru-ep'])"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.stdout.split() == ["True", "Evict", "the", "most", "recently", "used", "expert", "outside", "the", "call."]
    r = _run(["sim.replay", "--help"], env)
    assert "mru-ep" in r.stdout


@pytest.mark.slow
def test_ray_workers_import_the_plugins(tmp_path: Path, entry_point_site: Path) -> None:
    """Ray workers: an entry-point policy, and a plugin file that only the driver was told about."""
    pytest.importorskip("ray", reason="the dist extra (.[dist]) is not installed")
    (tmp_path / "mru_file.py").write_text(MRU.format(name="mru-file"))
    out = tmp_path / "out"
    r = _run(["sim.sweep", str(_sweep(tmp_path, ["mru-ep", "mru-file"], ["mru_file.py"])), "-o", str(out), "--jobs", "2",
              "--backend", "ray", "--no-progress"], _env(entry_point_site))
    assert r.returncode == 0, r.stderr
    assert set(_ok_rows(out)) == {"mru-ep", "mru-file"}


@pytest.mark.slow
def test_a_package_installed_by_pip_is_usable_by_name(tmp_path: Path) -> None:
    """A real package (pyproject declaring the entry point), built and installed by pip into a folder
    of its own (not into this environment), then used by name with no edit to this repo."""
    pkg = tmp_path / "pkg"
    (pkg / "mru_pip").mkdir(parents=True)
    (pkg / "mru_pip" / "__init__.py").write_text(MRU.format(name="mru-pip"))
    (pkg / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=68"]\nbuild-backend = "setuptools.build_meta"\n\n'
        '[project]\nname = "mru-pip"\nversion = "0.1"\n\n'
        '[project.entry-points."moe_offload_lab.policies"]\nmru-pip = "mru_pip"\n'
    )
    target = tmp_path / "target"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                        "--target", str(target), str(pkg)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert (target / "mru_pip-0.1.dist-info" / "entry_points.txt").exists()
    r = _run(["sim.replay", str(MIXTRAL), "--policy", "mru-pip", "--cache-per-layer", "4", "--no-progress"], _env(target))
    assert r.returncode == 0, r.stderr


def test_bad_plugins_are_one_line_naming_them(tmp_path: Path) -> None:
    (tmp_path / "collide.py").write_text("from policies import register\nfrom policies.lru import LRU\n\n\n"
                                         "@register('lru')\nclass Mine(LRU):\n    pass\n")
    (tmp_path / "boom.py").write_text("raise RuntimeError('broken on purpose')\n")
    base = ["sim.replay", str(MIXTRAL), "--cache-per-layer", "4", "--no-progress"]
    cases = {
        "no_such_plugin": "sim.replay: error: plugin 'no_such_plugin': cannot import it: no module named 'no_such_plugin' "
                          "(is it installed, or on PYTHONPATH?)",
        "collide": "sim.replay: error: plugin 'collide': collide.Mine registers the policy name 'lru', which the built-in "
                   "policies.lru.LRU has; choose another name",
        "boom": "sim.replay: error: plugin 'boom': raised on import: RuntimeError: broken on purpose (at boom.py:1)",
    }
    for plugin, line in cases.items():
        r = _run([*base, "--plugin", plugin], _env(tmp_path))
        assert r.returncode == 2 and r.stderr.splitlines() == [line], r.stderr
    # entry points: one that raises on import (when named), one named like a built-in (always)
    site = tmp_path / "site"
    for name, value, body in (("boom-ep", "boom_ep:Policy", "raise ImportError('needs a library that is missing')\n"),
                              ("fifo", "clash_ep:X", "from policies.fifo import FIFO as X\n")):
        mod = value.split(":")[0]
        (site / mod).mkdir(parents=True)
        (site / mod / "__init__.py").write_text(body)
        info = site / f"{mod}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {mod}\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text(f"[moe_offload_lab.policies]\n{name} = {value}\n")
    r = _run([*base, "--policy", "boom-ep"], _env(tmp_path / "site"))
    assert r.returncode == 2 and r.stderr.splitlines() == [
        "sim.replay: error: plugin 'fifo' (entry point clash_ep:X of the package clash_ep): its name collides with the "
        "built-in policy 'fifo'; rename the entry point"
    ], r.stderr
    (site / "clash_ep-0.1.dist-info" / "entry_points.txt").unlink()
    r = _run([*base, "--policy", "boom-ep"], _env(tmp_path / "site"))
    assert r.returncode == 2 and r.stderr.splitlines() == [
        "sim.replay: error: plugin 'boom-ep' (entry point boom_ep:Policy of the package boom_ep): raised on import: "
        "ImportError: needs a library that is missing (at __init__.py:1)"
    ], r.stderr
    r = _run([*base, "--policy", "lru"], _env(tmp_path / "site"))  # a broken plugin nobody names costs nothing
    assert r.returncode == 0, r.stderr
    # in a sweep file: the line of the plugins key
    s = _sweep(tmp_path, ["lru"], ["no_such_plugin"])
    with pytest.raises(SweepError, match=r"s.toml:5: plugins\[0\]: plugin 'no_such_plugin': cannot import it"):
        load_sweep(s)


# -- Python users: Policy classes and instances ------------------------------------------------------
@pytest.fixture
def mru_class():  # type: ignore[no-untyped-def]
    ns: dict[str, object] = {}
    exec(MRU.format(name="mru-py"), ns)  # noqa: S102  (a policy defined in the test process)
    yield ns["MRU"]
    del REGISTRY["mru-py"]


def test_replay_and_sweep_take_policy_classes_and_instances(tmp_path: Path, mru_class) -> None:  # type: ignore[no-untyped-def]
    cfg = CacheConfig(per_layer=4)
    by_spec = replay(MIXTRAL, "mru-py", cfg).metrics
    assert replay(MIXTRAL, mru_class, cfg).metrics == by_spec
    inst = mru_class()
    res = replay(MIXTRAL, inst, cfg)
    assert res.metrics == by_spec and res.config["policy"] == "mru-py"
    sweep = load_sweep(_sweep(tmp_path, ["lru"]), policies=[mru_class, REGISTRY["lfu"](decay=0.9)])
    assert [p.columns["policy"] for p in sweep.points][::2] == ["mru-py", "lfu(decay=0.9)"]
    summary = run_sweep(sweep, tmp_path / "out", jobs=1)
    assert not summary.errors
    assert _ok_rows(tmp_path / "out")["mru-py"] == by_spec["misses"]


def test_an_unregistered_policy_class_is_refused() -> None:
    class Nameless(DemandPolicy):
        def victim(self, cache, part, exclude):  # type: ignore[no-untyped-def]
            return None

    with pytest.raises(PolicySpecError, match="Nameless is not registered: decorate it with @register"):
        replay(MIXTRAL, Nameless, CacheConfig(per_layer=4))
    from policies.lru import LRU

    class MyLRU(LRU):
        pass

    with pytest.raises(PolicySpecError, match="MyLRU is not registered \\(it inherits the name 'lru'\\)"):
        replay(MIXTRAL, MyLRU(), CacheConfig(per_layer=4))
    with pytest.raises(PolicySpecError, match="registered twice"):
        register("lru-twice")(Nameless)
        try:
            register("lru-twice")(MyLRU)
        finally:
            del REGISTRY["lru-twice"]


def test_a_sweep_checks_the_trace_fields_a_policy_requires(tmp_path: Path) -> None:
    """`mobile(metric=entropy)` reads router probabilities, which the Mixtral trace lacks: refused up
    front at its line, as sim.replay refuses it, not at run time in every point."""
    s = _sweep(tmp_path, ["lru", "mobile(metric=entropy)"])
    with pytest.raises(SweepError, match=r"s.toml:2: policies\[1\]: .*mixtral-8x7b-gsm8k.jsonl.gz: policy 'mobile\(.*\)' needs "
                                         r"the trace field\(s\) probs, which this trace does not carry"):
        load_sweep(s)


def test_runtime_validate_with_a_plugin(tmp_path: Path) -> None:
    pytest.importorskip("torch", reason="the runtime extra (.[runtime]) is not installed")
    pytest.importorskip("transformers", reason="the runtime extra (.[runtime]) is not installed")
    (tmp_path / "mru_mod.py").write_text(MRU.format(name="mru-mod"))
    r = _run(["runtime.validate", "--model", "tiny-mixtral", "--policy", "mru-mod", "--plugin", str(tmp_path / "mru_mod.py"),
              "--cache-per-layer", "3", "--link", "emulated:1000GB/s", "--profile", "rtx4090", "--max-new-tokens", "4",
              "--out-dir", str(tmp_path / "v")])
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "v" / "validation.json").read_text())
    assert res["counts_equal"] and res["policy"] == "mru-mod"
