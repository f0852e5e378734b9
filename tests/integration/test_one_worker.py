"""The dry run and the worker build one trainer: `dry_run.build` calls the worker's own `build` on the shrunk recipe,
so on one recipe both make the same trainer class, the same training arguments (apart from the ones the dry run
lists as changed) and the same set of trainable parameters."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO, smoke_recipe

pytestmark = pytest.mark.integration

# Both builds, in one process started as a single rank, as `launcher train` starts one.
BOTH = """
import json, sys
from launcher import dry_run, pipeline, train as worker
from launcher.topology import Topology

recipe = sys.argv[1]
worker.distributed_env()
run = pipeline.prepare(recipe, {}, Topology((1,)), check_data=False)
real = worker.build(run.recipe, run.plan.ds_config, recipe, 1)
# one process, two builds: the first one's ZeRO-3 config is global in transformers (a worker builds once)
from transformers.integrations.deepspeed import unset_hf_deepspeed_config
unset_hf_deepspeed_config()
report = dry_run.Report()
dry = dry_run.build(recipe, {}, False, (1, 1), report)[0]

def trainable(trainer):
    return sorted(name for name, p in trainer.model.named_parameters() if p.requires_grad)

print("RESULT " + json.dumps({
    "classes": [type(real.trainer).__name__, type(dry.trainer).__name__],
    "args": [real.trainer.args.to_dict(), dry.trainer.args.to_dict()],
    "trainable": [trainable(real.trainer), trainable(dry.trainer)],
    "notes": report.notes,
}, default=str))
"""

LORA = {"target_modules": ["q_proj", "v_proj"]}
GATHER = {"overrides": {"zero_optimization": {"stage3_gather_16bit_weights_on_model_save": True}}}


def sentiment(tmp_path):
    from tests.helpers import sentiment_recipe

    return sentiment_recipe(tmp_path)


@pytest.mark.parametrize("make", [
    lambda tmp_path: smoke_recipe(tmp_path, lora=LORA, deepspeed=GATHER),
    sentiment,
], ids=["sft-lora", "classification-frozen"])
def test_dry_run_builds_what_the_worker_builds(tmp_path, make):
    recipe = make(tmp_path)
    proc = subprocess.run([sys.executable, "-c", BOTH, str(recipe)], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    real_class, dry_class = result["classes"]
    assert real_class == dry_class and real_class in ("SFTTrainer", "Trainer")
    real_trainable, dry_trainable = result["trainable"]
    assert real_trainable == dry_trainable and real_trainable  # the same parameters train, and some do
    # the dry run lists the training arguments it changes; every other argument is the real run's
    listed = next(n for n in result["notes"] if n.startswith("training arguments changed for the dry run: "))
    changed = set(listed.split(": ", 1)[1].split(", "))
    from launcher.dry_run import DERIVED

    real_args, dry_args = result["args"]
    differ = {k for k in real_args.keys() | dry_args.keys() if real_args.get(k) != dry_args.get(k)}
    assert differ <= changed | set(DERIVED), differ - changed - set(DERIVED)
    assert {"max_steps", "save_steps"} <= differ  # the shrink is real, and seen
