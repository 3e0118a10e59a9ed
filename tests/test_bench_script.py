"""In-process tests of scripts/bench.py's own logic (options, the issue's targets, n/a cells,
detection of ``--fsync local``); the workloads themselves are measured, not tested."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import bench


def test_quick_mode_uses_small_sizes_and_never_writes_into_docs(monkeypatch):
    monkeypatch.delenv("BENCH_QUICK", raising=False)
    args = bench.parse_args(["--quick"])
    assert (args.runs, args.big_mib, args.huge_mib, args.small_files) == (1, 64, 128, 300)
    assert "docs" not in args.out.parts
    assert bench.parse_args([]).out == bench.ROOT / "docs" / "benchmarks.md"


def test_quick_mode_from_the_environment_and_a_size_given_explicitly_wins(monkeypatch):
    monkeypatch.setenv("BENCH_QUICK", "1")
    args = bench.parse_args(["--big-mib", "10"])
    assert args.quick and args.big_mib == 10 and args.huge_mib == bench.QUICK["huge_mib"]


def test_only_and_contender_take_comma_lists_in_the_benchmark_order():
    args = bench.parse_args(["--only", "sqlite,seek", "--only", "drain", "--contender", "privifs,gocryptfs"])
    assert args.only == ["seek", "sqlite", "drain"]
    assert args.contender == ["gocryptfs", "privifs"]
    assert bench.parse_args([]).only == list(bench.WORKLOADS)


def test_an_unknown_workload_is_refused_with_the_known_names():
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(["--only", "seek,nonesuch"])
    assert "nonesuch" in str(exc.value) and "sqlite" in str(exc.value)


def test_fsync_local_is_detected_only_in_the_fsync_options_own_help():
    assert bench.has_fsync_local("  --fsync {vault,local}\n        when fsync returns\n  --other X\n")
    assert bench.has_fsync_local("  --fsync MODE  vault (default) or local: durable on this disk\n")
    assert not bench.has_fsync_local("  --fsync-timeout SECONDS\n        local timeout\n  --x\n")
    assert not bench.has_fsync_local("  --fsync MODE  vault only\n  --cache-dir DIR  a local directory\n")


def _row(table: str, what: str) -> str:
    return next(line for line in table.splitlines() if line.startswith(f"| {what}"))


def test_targets_are_judged_against_bounds_contenders_and_another_metric():
    results = {
        "privifs": {
            "first_byte_s": [0.2, 0.5, 0.4],
            "drain_fps": [390.0],
            "cold_read_MBps": [300.0],
            "sqlite_delete_local_cps": [60.0],
            "n/a": {"cache_peak_MiB": "not run"},
        },
        "gocryptfs": {"cold_read_MBps": [250.0]},
        "local disk": {"sqlite_delete_cps": [100.0]},
    }
    table = bench.targets_table(results)
    assert _row(table, "first byte, cold 2 GiB file").endswith("**missed** |")  # median 0.4 s > 0.3 s
    assert _row(table, "5,000 small files created").endswith("**missed** |")
    assert _row(table, "1 GiB cold sequential read ≥ gocryptfs").endswith("| met |")
    assert "60.00 vs 100 1/s: **0.60×**" in _row(table, "same with --fsync local")
    assert "not measured: not run" in _row(table, "4 GiB file read")
    assert "not measured in this run" in _row(table, "untar ≤ gocryptfs")


def test_report_marks_not_applicable_cells_apart_from_workloads_not_run(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "_chart", lambda *a: None)
    results = {
        "gocryptfs": {"first_byte_s": [0.003], "n/a": {"cache_peak_MiB": "privifs only"}},
        "privifs": {"first_byte_s": [0.5], "cache_peak_MiB": [900.0]},
    }
    args = bench.parse_args(["--quick"])
    bench.report(results, {}, args, 0.0, 60.0, tmp_path / "b.md", tmp_path / "b.png", "cmd", ["* sizes: x"], "m")
    md = (tmp_path / "b.md").read_text()
    assert "| … cache directory at its largest | MiB | n/a | 900 |" in md
    assert "SQLite" not in md.split("## Targets")[0]  # not run: no row
    assert "| first byte of a cold 2 GiB file | s | 0.0030 | 0.50 |" in md
    assert "* sizes: x" in md and "* machine: m" in md


def test_a_page_cache_that_cannot_be_dropped_stops_the_run_instead_of_measuring_a_warm_read(tmp_path, monkeypatch):
    monkeypatch.setattr(bench.os, "sync", lambda: None)
    with pytest.raises(RuntimeError, match="cold reads need root"):
        bench.drop_caches(tmp_path / "missing" / "drop_caches")


def test_the_cache_directory_size_counts_a_file_seen_in_two_places_once(tmp_path):
    # a download renamed from incoming/ into the entries while the sampler walks the directory
    # is met twice; a hard link stands in for that moment (one file, two names)
    (tmp_path / "incoming").mkdir()
    (tmp_path / "entries").mkdir()
    (tmp_path / "incoming" / "part").write_bytes(b"x" * 65536)
    one = bench.dir_bytes(tmp_path)
    (tmp_path / "entries" / "part").hardlink_to(tmp_path / "incoming" / "part")
    assert one >= 65536 and bench.dir_bytes(tmp_path) == one
