"""Every results file that README.md or results/README.md links or names is committed (git ls-files)."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# a backticked word in results/README.md is a file when it has one of these endings, a folder when it ends in /
FILE_ENDINGS = (".json", ".txt", ".md", ".png", ".csv", ".parquet", ".jsonl", ".yaml", ".html", ".log")
# first path parts that are repository folders, not results (results/README.md also names scripts)
REPO_FOLDERS = {"scripts", "bench", "methods", "masks", "tasks", "conf", "tests"}


def tracked_results() -> list[str]:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(["git", "ls-files", "results"], cwd=REPO, capture_output=True, text=True, check=True)
    return out.stdout.split()


def _words(text: str):
    """Markdown link targets and the whitespace-separated words of every `code span`."""
    yield from re.findall(r"\]\(([^)\s]+)\)", text)
    for span in re.findall(r"`([^`\n]+)`", text):
        yield from span.split()


def cited_paths(readme: Path) -> set[str]:
    """Paths under results/ that ``readme`` links or names, as 'results/...' (a folder keeps its final /), and
    bare names (one part: a run folder, or a file or folder inside the run folders it lists) as '*/name'."""
    in_results = readme.parent.name == "results"
    cited = set()
    for word in _words(readme.read_text()):
        word = word.strip(".,;:()")
        if "://" in word or "<" in word or word.startswith(("-", ".", "#")):
            continue
        if word.startswith("results/"):
            cited.add(word)
        elif in_results and re.fullmatch(r"[\w.-]+(/[\w.-]+)*/?", word):
            is_path = word.endswith("/") or word.endswith(FILE_ENDINGS)
            if is_path and word.split("/")[0] not in REPO_FOLDERS:
                cited.add(f"results/{word}" if "/" in word.rstrip("/") else f"*/{word}")
    return cited


def is_tracked(path: str, tracked: list[str], root: Path = REPO) -> bool:
    if path.startswith("*/"):  # a bare name: some tracked results file or folder of that name
        name = path[2:]
        if (root / "results" / name.rstrip("/")).exists():  # it is results/<name> itself: that one must be in git
            return is_tracked(f"results/{name}", tracked, root)
        return any(f.endswith("/" + name) or f"/{name.rstrip('/')}/" in f for f in tracked)
    if path.endswith("/") or path == "results":
        return any(f.startswith(path.rstrip("/") + "/") for f in tracked)
    return path in tracked or any(f.startswith(path + "/") for f in tracked)


@pytest.mark.parametrize("readme", ["README.md", "results/README.md"])
def test_every_cited_results_path_is_committed(readme):
    tracked = tracked_results()
    cited = cited_paths(REPO / readme)
    assert cited, f"{readme} names no results path: the parser is broken"
    missing = sorted(p for p in cited if not is_tracked(p, tracked))
    assert not missing, f"{readme} cites results files that are not in git: {missing}"


def test_the_parser_finds_what_the_readmes_cite(tmp_path):
    """Negative control: the shapes the READMEs use are found, and a path that is not in git is caught."""
    text = ("![x](results/run/a.png) see `results/run` and `attnbench report results/other --out results/third`;\n"
            "| `h200-probe/` | `selfcheck-first.json`, `h200-decode/flex-decode-probe.txt`, `scripts/run.sh`, "
            "`results/<run_id>/`, `python`, `runs.tgz` |")
    fake = tmp_path / "results" / "README.md"
    fake.parent.mkdir()
    fake.write_text(text)
    cited = cited_paths(fake)
    assert cited == {"results/run/a.png", "results/run", "results/other", "results/third", "*/h200-probe/",
                     "*/selfcheck-first.json", "results/h200-decode/flex-decode-probe.txt"}
    tracked = ["results/h200-probe/selfcheck-first.json", "results/run/a.png"]
    assert is_tracked("*/selfcheck-first.json", tracked) and is_tracked("*/h200-probe/", tracked)
    # a bare name that is a file at the top of results/ must be that file in git, not a namesake in a run folder
    (tmp_path / "results" / "summary.md").write_text("x")
    namesake = ["results/h200-run/device-logs/summary.md"]
    assert not is_tracked("*/summary.md", namesake, root=tmp_path)
    assert is_tracked("*/summary.md", namesake + ["results/summary.md"], root=tmp_path)
    assert is_tracked("results/run", tracked) and not is_tracked("results/other", tracked)
    assert not is_tracked("*/selfcheck-h200.json", tracked) and not is_tracked("*/gpu-tests/", tracked)
    assert not is_tracked("*/h200", tracked)  # a prefix of a folder name is not that folder


# the device tool sends the tracked tree plus the carried wheels (~3 MiB) and Triton cache, capped at 64 MiB together;
# the tenth session found the tree at 63.8 MiB (self-contained report.html pages, now git-ignored)
TREE_BUDGET_MIB = 56


def tracked_tree_mib(root: Path) -> float:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True)
    return sum((root / p).stat().st_size for p in out.stdout.decode().split("\0") if p and (root / p).is_file()) / 2**20


def test_the_tracked_tree_leaves_room_for_the_device_carry():
    tracked_results()  # skips outside a git checkout
    mib = tracked_tree_mib(REPO)
    assert mib < TREE_BUDGET_MIB, f"tracked files {mib:.1f} MiB: the device call sends at most 64 MiB with its carry"


def test_no_report_html_is_tracked():
    html = [p for p in tracked_results() if p.endswith("/report.html")]
    assert not html, f"report.html pages are regenerated, not committed: {html[:3]}"


def test_the_tree_size_counts_what_is_tracked(tmp_path):
    """Negative control: a tracked 2 MiB file shows up in the count, an untracked one does not."""
    if shutil.which("git") is None:
        pytest.skip("no git")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "big.bin").write_bytes(b"\0" * 2**21)
    (tmp_path / "loose.bin").write_bytes(b"\0" * 2**21)
    subprocess.run(["git", "add", "big.bin"], cwd=tmp_path, check=True)
    assert tracked_tree_mib(tmp_path) == pytest.approx(2.0)
