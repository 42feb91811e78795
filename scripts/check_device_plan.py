"""Which cases a resumed device sweep would run, checked on the CPU before spending device time:
    python scripts/check_device_plan.py RUN_DIR RETRY_STATUSES [sweep overrides ...]
e.g. python scripts/check_device_plan.py results/h200-sparse timeout sweep=sparse "seq_lens=[262144]"
(RETRY_STATUSES: comma-separated, or '' for none). The plan is built as for device=cuda (the device check is
bypassed: this machine has no GPU); the run folder's rows decide what is done, as in `attnbench` itself."""
import sys
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from attnbench.cli import CONF_DIR
import attnbench.config.plan as P
P.resolve_devices = lambda cfg: ["cuda:0"]
from attnbench.config.plan import build_plan
from attnbench.record.store import RowStore
from pathlib import Path
run=sys.argv[1]; retry=tuple(sys.argv[2].split(',')) if sys.argv[2] else (); ov=sys.argv[3:]
with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="x"):
    cfg = compose(config_name="config", overrides=ov)
plain = OmegaConf.to_container(cfg, resolve=True); plain.pop("hydra", None)
plan = build_plan(plain)
store = RowStore(Path(run), retry=retry, method_options=plain.get("method_options"))
todo=[c for c in plan.runnable if c.case_id not in store.done]
uns=[c for c,_ in plan.unsupported if c.case_id not in store.done]
print(len(plan.runnable), 'runnable;', len(todo), 'to run;', len(uns), 'new unsupported rows')
for c in todo: print('  ', c.method, c.mask, c.seq_q, c.mode)
