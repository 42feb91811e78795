"""Around the masks: plugin masks from a mask_mod, pictures, the `attnbench masks` CLI, describe(), and the
conf/mask presets."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from attnbench import masks
from attnbench.masks import make_mask
from attnbench.masks.cli import main
from attnbench.masks.describe import describe
from attnbench.masks.picture import mask_image, save_mask_png
from attnbench.masks.reference import block_counts_from_dense
from attnbench.masks.registry import MASKS

from test_masks import check_block_forms, check_block_mask, check_dense_forms

PRESETS = Path(__file__).resolve().parent.parent / "conf" / "mask"


# ---- plugin masks ---------------------------------------------------------------------------------------
@pytest.fixture
def checkerboard():
    def fn(b, h, q_idx, kv_idx):
        return ((q_idx // 8 + kv_idx // 8) % 2 == 0) & (kv_idx <= q_idx + 3)

    spec_cls = masks.register_mask_mod("test_checkerboard", fn, causal=False, description="test mask")
    yield spec_cls, fn
    MASKS.pop("test_checkerboard")


@pytest.mark.parametrize("seq_q, seq_kv", [(70, 50), (33, 33), (1, 90)])
def test_a_registered_mask_mod_gets_every_representation(checkerboard, seq_q, seq_kv):
    spec_cls, fn = checkerboard
    bound = make_mask("test_checkerboard").bind(seq_q, seq_kv)
    assert isinstance(bound.spec, spec_cls) and bound.spec.description == "test mask"
    dense = check_dense_forms(bound)
    q, kv = torch.arange(seq_q)[:, None], torch.arange(seq_kv)[None, :]
    assert torch.equal(dense, fn(0, 0, q, kv))
    check_block_forms(bound, dense, 16, 32)
    check_block_mask(bound, dense, 16)
    assert bound.varlen() is None


def test_register_mask_mod_refuses_duplicates_and_non_callables(checkerboard):
    with pytest.raises(ValueError, match="registered twice"):
        masks.register_mask_mod("test_checkerboard", lambda b, h, q, kv: q >= kv)
    with pytest.raises(TypeError, match="callable"):
        masks.register_mask_mod("test_not_callable", 3)


# ---- pictures -----------------------------------------------------------------------------------------
def test_mask_image_is_the_dense_mask_when_small_and_block_averages_when_large():
    small = make_mask("sliding_window(left=3)").bind(40, 60)
    assert torch.equal(mask_image(small, max_pixels=64), small.dense().float())
    large = make_mask("document(num_docs=7,causal=True)").bind(1000)
    image = mask_image(large, max_pixels=100)  # tiles of 10 x 10 tokens
    assert torch.allclose(image, block_counts_from_dense(large.dense(), 10, 10).float() / 100)


def test_save_mask_png_writes_a_picture(tmp_path):
    import matplotlib.image

    path = save_mask_png(make_mask("bigbird(block=16)"), tmp_path / "sub" / "bigbird.png", seq_q=300)
    assert path == tmp_path / "sub" / "bigbird.png"
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100
    decode = save_mask_png(make_mask("decode").bind(4, 5000), tmp_path / "decode.png")
    assert decode.stat().st_size > 0


# ---- CLI ----------------------------------------------------------------------------------------------
def test_cli_list_shows_every_mask_with_its_defaults(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in masks.list_masks():
        assert name in out
    assert "left=256, right=0, align='bottom_right'" in out
    assert "by params" in out  # sliding_window's causality depends on `right`


def test_cli_show_writes_the_png_and_prints_its_path(tmp_path, capsys):
    out_path = tmp_path / "w.png"
    assert main(["show", "sliding_window", "left=16", "right=4", "--seq", "64", "--seq-kv", "96",
                 "--out", str(out_path)]) == 0
    assert capsys.readouterr().out.strip() == str(out_path)
    assert out_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_show_defaults_to_name_png_in_the_current_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["show", "document", "lengths=[100,28]", "--seq", "128"]) == 0
    assert (tmp_path / "document.png").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["show", "sliding_window", "left=-1"], "'left'"),
        (["show", "nosuchmask"], "unknown mask"),
        (["show", "causal", "align"], "key=value"),
        (["show", "document", "lengths=[5,5]", "--seq", "64"], "sum to 10"),
        (["show", "sliding_window", "--seq", "abc"], "invalid int"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_cli_bad_input_exits_2_with_the_reason(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


# ---- describe -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "entry, seq_q, seq_kv, same_as",
    [
        ("sliding_window(left=100000)", 64, 64, "causal"),
        ("sliding_window(left=100000,right=100000)", 64, 80, "full"),
        ("sliding_window(left=100000,align=top_left)", 64, 80, "causal(align=top_left)"),
        ("prefix_lm(prefix=0)", 50, 50, "causal"),
        ("chunked_local(chunk=64)", 64, 64, "causal"),
        ("document(lengths=[64])", 64, 64, "full"),
        ("sliding_window(left=3)", 64, 64, None),
        ("dilated_sliding_window(left=64,right=64,dilation=1)", 64, 64, "full"),  # any mask: full when all visible
    ],
)
def test_describe_says_when_a_mask_is_plain_full_or_causal(entry, seq_q, seq_kv, same_as):
    assert describe(make_mask(entry), seq_q, seq_kv)["same_as"] == same_as


def test_describe_reports_metadata_and_counts():
    info = describe(make_mask("document(num_docs=4,causal=True)"), 128)
    assert info["causal"] is True and info["supports_cross"] is False and info["varlen"] is True
    assert info["visible_pairs"] == make_mask("document(num_docs=4,causal=True)").bind(128).visible_pairs()
    assert info["params"]["num_docs"] == 4
    assert "visible_pairs" not in describe(make_mask("full"))


# ---- presets ------------------------------------------------------------------------------------------
def test_every_mask_has_a_preset_that_loads_to_its_defaults():
    presets = {path.stem: yaml.safe_load(path.read_text()) for path in PRESETS.glob("*.yaml")}
    assert sorted(presets) == masks.list_masks()
    for stem, entry in presets.items():
        spec = make_mask(entry)
        assert spec.name == stem and spec == MASKS[stem]()


# ---- attnbench masks time ---------------------------------------------------------------------------------
def test_masks_time_writes_a_row_per_mask_with_exact_counts(tmp_path, capsys):
    import json

    out = tmp_path / "build.json"
    entries = ["causal", "sliding_window(left=100,right=20)", "document(num_docs=3,causal=True)"]
    assert main(["time", *entries, "--seq", "300", "--repeats", "2", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["environment"]["device_name"] == "cpu"
    rows = data["rows"]
    assert [r["mask"] for r in rows] == [make_mask(e).label for e in entries]
    for entry, row in zip(entries, rows):
        dense = make_mask(entry).bind(300, 300).dense()
        blocks = block_counts_from_dense(dense, 128, 128)
        assert row["status"] == "ok" and row["repeats"] == 2
        assert row["visible_pairs"] == int(dense.sum())
        assert row["density"] == pytest.approx(float(dense.float().mean()))
        assert row["computed_blocks"] == int((blocks > 0).sum()) and row["total_blocks"] == blocks.numel()
        for stage in ("visible_pairs", "block_layout", "block_mask"):
            assert 0 < row[f"{stage}_ms_min"] <= row[f"{stage}_ms_median"]
    assert "sliding_window(left=100,right=20)" in capsys.readouterr().out


def test_masks_time_gives_a_mask_it_cannot_build_an_error_row(tmp_path):
    import pandas as pd

    out = tmp_path / "build.csv"
    assert main(["time", "causal", "prefix_lm(prefix=500)", "--seq", "200", "--repeats", "1", "--out", str(out)]) == 1
    table = pd.read_csv(out, keep_default_na=False)
    assert list(table["status"]) == ["ok", "error"]
    assert "prefix" in table["reason"][1]


@pytest.mark.parametrize("argv, field", [
    (["time", "--seq", "0"], "--seq"),
    (["time", "--repeats", "0"], "--repeats"),
    (["time", "--device", "cuda:7"], "--device"),
    (["time", "--device", "tpu"], "--device"),
])
def test_masks_time_refuses_bad_options_before_any_work(argv, field, capsys):
    assert main(argv) == 2
    assert field in capsys.readouterr().err


def test_masks_time_refuses_an_unknown_mask():
    assert main(["time", "no_such_mask", "--seq", "64"]) == 2
