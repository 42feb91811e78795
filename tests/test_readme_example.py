"""The README's "Adding a method" example, run verbatim: copied out of README.md into a folder of its own and
given to the CLI as a relative plugin path from that folder, over full and causal self-attention, causal
cross-attention (bottom-right, seq_q < seq_kv and seq_q > seq_kv), GQA, backward and decode."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_example() -> str:
    """The one python block of the README's "Adding a method" section, verbatim."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Adding a method\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```python\n(.*?)^```$", section, flags=re.S | re.M)
    assert len(blocks) == 1, f"expected one python block in 'Adding a method', found {len(blocks)}"
    return blocks[0]


def _run(folder: Path, source: str, results: Path, *overrides: str) -> list[dict]:
    (folder / "my_attention.py").write_text(source)
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # the plugin is found by its path, not through the import path
    result = subprocess.run(
        [sys.executable, "-m", "attnbench.cli", "sweep=smoke", "plugins=[my_attention.py]", "methods=[my_attention]",
         f"results_dir={results}", "run_id=readme", "dtype=float32", "batch=1", "head_dim=16", "heads_q=4",
         "calibrate=false", "timing.budget_ms=2", "timing.warmup_ms=0", "timing.min_reps=2", "timing.max_reps=3",
         *overrides],
        cwd=folder, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [json.loads(line) for line in (results / "readme" / "rows.jsonl").read_text().splitlines()]


def _table(rows) -> str:
    return "\n".join(f"{r['mask']:7s} {r['mode']:8s} {r['seq_q']:>3}x{r['seq_kv']:<3} kv{r['heads_kv']} "
                     f"{r['status']:12s} {r.get('reason') or ''}" for r in rows)


def test_the_readme_example_runs_verbatim_as_a_relative_plugin_and_is_ok_everywhere(tmp_path):
    folder = tmp_path / "user"
    folder.mkdir()
    assert folder.resolve() != ROOT.resolve() and Path.cwd().resolve() != folder.resolve()
    rows = _run(folder, readme_example(), tmp_path / "results", "masks=[full,causal]", "seq_lens=[32]",
                "cross_lens=[[16,32],[32,16]]", "heads_kv=[4,2]", "modes=[fwd,bwd,fwd_bwd,decode]")
    assert {r["method"] for r in rows} == {"my_attention"}
    # the grid: 2 masks x 3 length pairs x 2 head layouts x 3 modes, and decode against caches of 32 and 16
    assert len(rows) == 2 * 3 * 2 * 3 + 2 * 2 * 2, _table(rows)
    assert {(r["seq_q"], r["seq_kv"]) for r in rows if r["mode"] != "decode"} == {(32, 32), (16, 32), (32, 16)}
    assert {(r["seq_q"], r["seq_kv"]) for r in rows if r["mode"] == "decode"} == {(1, 32), (1, 16)}
    assert {r["pattern"] for r in rows} >= {"noncausal_self", "causal_self", "noncausal_cross", "causal_cross"}
    # the example declares every capability these cases need: all ok, none wrong
    assert {r["status"] for r in rows} == {"ok"}, _table(rows)


def test_the_readme_example_with_top_left_causal_is_caught(tmp_path):
    """Negative control: the example's bottom-right handling replaced by SDPA's top-left is_causal (what the
    README used to show) is wrong on causal cross-attention, and the harness says so."""
    source = readme_example()
    broken = source.replace("elif mask.offset == 0:", "elif True:")
    assert broken != source, "the README example no longer has the line this control changes"
    folder = tmp_path / "user"
    folder.mkdir()
    rows = _run(folder, broken, tmp_path / "results", "masks=[causal]", "seq_lens=[32]", "cross_lens=[[16,32]]",
                "heads_kv=[4]", "modes=[fwd]")
    status = {(r["seq_q"], r["seq_kv"]): r["status"] for r in rows}
    assert status == {(32, 32): "ok", (16, 32): "wrong"}, _table(rows)
