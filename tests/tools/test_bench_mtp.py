"""bench/bench_mtp.py runs end to end at tiny scale (random weights: drafts are never accepted)."""

import json

from tests.fixtures import load_script

bench_mtp = load_script("bench/bench_mtp.py")


def test_bench_mtp_smoke(tmp_path, capsys):
    out = str(tmp_path / "mtp.json")
    args = ["--model", "flash-slice-2", "--scale-down", "--batch", "2", "--steps", "1", "--iters", "2"]
    assert bench_mtp.main(args + ["--rounds", "1", "--context", "20", "--json", out]) == 0
    runs = json.load(open(out))["runs"]
    assert [(r["batch"], r["k"]) for r in runs] == [(2, 0), (2, 1)]
    assert all(r["tokens"] > 0 and r["accept_length"] >= 1 for r in runs)
    assert runs[0]["accept_length"] == 1 and runs[0]["speedup"] == 1
    assert "| 2 | 1 |" in capsys.readouterr().out
