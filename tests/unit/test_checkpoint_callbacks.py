"""The worker's checkpoint callbacks driven by HF's own callback handler, in the order train.build gives them, in a
one-rank gloo group: a save into an existing checkpoint-N withdraws its marker before it starts (issue 13, item 9)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch.distributed as dist
from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback, TrainerControl, TrainerState
from transformers.trainer_utils import IntervalStrategy, SaveStrategy

from launcher import checkpoints
from launcher.callbacks import CompleteCheckpoints, StopOnRequest
from tests.helpers import free_port


@pytest.fixture(scope="module", autouse=True)
def one_rank():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def handler(tmp_path, save_strategy):
    stop = tmp_path / "stop"
    callbacks = [DefaultFlowCallback, StopOnRequest(str(stop)), CompleteCheckpoints(tmp_path, 1, 3, None)]
    args = SimpleNamespace(device="cpu", logging_first_step=False, logging_strategy=IntervalStrategy.NO,
                           eval_strategy=IntervalStrategy.NO, save_strategy=save_strategy, eval_delay=0)
    return CallbackHandler(callbacks, None, None, None, None), args, stop


def marked(tmp_path, step):
    path = checkpoints.directory(tmp_path) / f"checkpoint-{step}"
    path.mkdir(parents=True, exist_ok=True)
    checkpoints.mark_complete(path, {"step": step, "max_steps": 10, "world_size": 1})
    return path


@pytest.mark.parametrize("event", ["on_step_end", "on_epoch_end"])
def test_the_marker_goes_before_a_save_into_an_existing_checkpoint(tmp_path, event):
    """on_step_end: the stop request (USR1) sets should_save; on_epoch_end: HF's flow callback under save_strategy
    epoch does, for the step the stop just saved."""
    hooks, args, stop = handler(tmp_path, SaveStrategy.EPOCH)
    stop.touch()
    state, control = TrainerState(global_step=1, max_steps=10, is_world_process_zero=True), TrainerControl()
    path = marked(tmp_path, 1)
    getattr(hooks, event)(args, state, control)
    assert control.should_save and not checkpoints.is_complete(path)


def test_no_save_no_change(tmp_path):
    hooks, args, _ = handler(tmp_path, SaveStrategy.STEPS)
    state, control = TrainerState(global_step=3, max_steps=10, save_steps=4, is_world_process_zero=True), \
        TrainerControl()
    path = marked(tmp_path, 3)
    hooks.on_step_end(args, state, control)
    assert not control.should_save and checkpoints.is_complete(path)


def test_training_from_a_rollback_moves_the_newer_checkpoints_aside(tmp_path, capsys):
    hooks, args, _ = handler(tmp_path, SaveStrategy.STEPS)
    for step in (4, 8):
        marked(tmp_path, step)
    hooks.on_train_begin(args, TrainerState(global_step=4, max_steps=10, is_world_process_zero=True),
                         TrainerControl())
    assert [c.name for c in checkpoints.listing(tmp_path)] == ["checkpoint-4"]
    assert "rolled back to step 4: moved checkpoint-8" in capsys.readouterr().out
