"""Each task measures something: exact attention learns it in seconds on the CPU with a small config, and a
control mixer that sees no other token (tests/plugins/control_methods.py ``q_nomix``) does not. These fail if a
generator, the model, the trainer or the metric breaks (a generator whose answer is not in the input, a model
whose attention is not wired, a metric that counts the wrong positions)."""
from __future__ import annotations

from pathlib import Path

import pytest

from attnbench.config.plugins import load_plugins
from attnbench.tasks import TASKS, task_params
from attnbench.tasks.train import train_task

load_plugins([str(Path(__file__).resolve().parent / "plugins" / "control_methods.py")])

SMALL = dict(d_model=32, batch=32, steps=300, lr=1e-2)
# task: (length, overrides, exact must reach, control must stay below); bpc: lower is better
CASES = {
    "mqar": (32, dict(vocab=64, kv_pairs=4, batch=64), 0.9, 0.2),
    "niah": (32, dict(vocab=64, key_ids=8, value_ids=8, depths=5), 0.8, 0.1),
    "selective_copy": (24, dict(alphabet=10, tokens=4), 0.7, 0.3),
    "listops": (32, dict(max_depth=3, max_args=4, lr=3e-3, steps=400, eval_batches=8), 0.33, 0.26),
    "digits": (64, dict(lr=3e-3), 0.6, 0.25),
    "sort": (16, dict(steps=400, lr=3e-3, batch=64), 0.8, 0.1),
    "lookup": (16, dict(vocab=64), 0.9, 0.2),
    "delayed_copy": (32, dict(lr=3e-3, steps=150), 0.9, 0.2),  # 1.000 at 150 steps (and at 300)
    "chunk_reverse": (32, dict(lr=3e-3, steps=150), 0.9, 0.2),  # 0.999 at 150 steps
}
SLOW = {"listops", "digits"}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread


def _train(task, method, seq, overrides):
    params = task_params(task, {**SMALL, **overrides})
    outcome = train_task(task, params, seq, method, seed=0)
    assert outcome.status == "ok", outcome.reason
    return outcome


@pytest.mark.parametrize("task", [pytest.param(t, marks=pytest.mark.slow) if t in SLOW else t for t in CASES])
def test_exact_attention_learns_and_a_control_does_not(task):
    if not TASKS[task].availability()[0]:
        pytest.skip(TASKS[task].availability()[1])
    seq, overrides, exact_floor, control_ceiling = CASES[task]
    exact = _train(task, "sdpa_math", seq, overrides)
    control = _train(task, "q_nomix", seq, overrides)
    assert exact.value >= exact_floor, (task, exact.value, exact.extras)
    assert control.value <= control_ceiling, (task, control.value, control.extras)
    assert exact.value > control.value + 0.1


@pytest.mark.slow
def test_char_lm_attention_beats_the_bigram_control():
    """With no mixing the model is a bigram model of the text; attention must get well below it in bpc."""
    overrides = dict(d_model=32, steps=300, heads=2)
    exact = _train("char_lm", "sdpa_math", 32, overrides)
    control = _train("char_lm", "q_nomix", 32, overrides)
    assert control.value > 2.8, control.value  # a bigram model of English text and code is above ~3 bits
    assert exact.value < control.value - 0.3, (exact.value, control.value)
