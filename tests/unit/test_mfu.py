"""MFU: the device's dense 16-bit peak by exact name, FLOPs per token for what trains, rate windows without evaluation
and saving (issue 14, item 10). Device names are torch.cuda.get_device_name's, simulated."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from launcher import tracking

PEAKS = {  # name -> (bf16 peak, fp16 peak); datasheet figures, dense
    "NVIDIA H100 80GB HBM3": (989e12, 989e12), "NVIDIA H100 PCIe": (756e12, 756e12), "NVIDIA H100 NVL": (835e12,) * 2,
    "NVIDIA H200": (989e12,) * 2, "NVIDIA H200 NVL": (835e12,) * 2, "NVIDIA H800": (989e12,) * 2,
    "NVIDIA H20": (148e12,) * 2, "NVIDIA A100-SXM4-80GB": (312e12,) * 2, "NVIDIA A100 80GB PCIe": (312e12,) * 2,
    "NVIDIA A800-SXM4-80GB": (312e12,) * 2, "NVIDIA B200": (2250e12,) * 2, "NVIDIA L40S": (362e12,) * 2,
    "NVIDIA L40": (181e12,) * 2, "NVIDIA L4": (121e12,) * 2, "NVIDIA A10G": (70e12,) * 2, "NVIDIA A10": (125e12,) * 2,
    "Tesla V100-SXM2-32GB": (None, 125e12), "Tesla V100-PCIE-16GB": (None, 112e12), "Tesla T4": (None, 65e12),
    "NVIDIA GeForce RTX 4090": (None, None), "": (None, None),
}


@pytest.mark.parametrize("name", PEAKS)
def test_peak_by_exact_name(name):
    assert (tracking.peak_flops(name, True), tracking.peak_flops(name, False)) == PEAKS[name]


@pytest.mark.parametrize(("name", "sms", "peak"), [
    ("NVIDIA A100-SXM4-80GB MIG 1g.10gb", 14, 312e12 * 14 / 108),  # a 1g slice: 14 of the A100's 108 SMs
    ("NVIDIA A100-SXM4-80GB MIG 3g.40gb", None, 312e12 * 3 / 7),  # no SM count: 3 of 7 compute slices
    ("NVIDIA H100 80GB HBM3 MIG 7g.80gb", 132, 989e12),
    ("NVIDIA H100 PCIe MIG 2g.20gb", 32, 756e12 * 32 / 114),
])
def test_mig_slice_gets_its_share(name, sms, peak):
    assert tracking.peak_flops(name, True, sms) == pytest.approx(peak)


def test_flops_per_token_by_hand():
    # Llama 3.1 8B full fine-tune at 8k context: 6N plus causal attention 6 x 32 layers x 8192 x 4096
    full = tracking.flops_per_token(8_030_261_248, 0, 32, 4096, 8192)
    assert full == 48_181_567_488 + 6_442_450_944
    assert 0.11 < 1 - 6 * 8_030_261_248 / full < 0.13  # what leaving attention out understated MFU by
    # 70B LoRA r 16: 6 per adapter weight, 4 per frozen one, no attention counted here
    assert tracking.flops_per_token(207_093_760, 70_553_706_496) == 1_242_562_560 + 282_214_825_984


class Tiny(torch.nn.Module):
    """A frozen 4x4 layer, a trainable 4x2 one, a 4-bit weight as bitsandbytes stores it (two per byte)."""

    def __init__(self):
        super().__init__()
        self.frozen, self.head = torch.nn.Linear(4, 4, bias=False), torch.nn.Linear(4, 2, bias=False)
        self.frozen.requires_grad_(False)
        packed = torch.nn.Parameter(torch.zeros(32, 1, dtype=torch.uint8), requires_grad=False)
        packed.quant_state = SimpleNamespace(shape=torch.Size([8, 8]))
        self.packed = packed
        self.config = SimpleNamespace(num_hidden_layers=2, num_attention_heads=2, head_dim=8, hidden_size=4)


def test_model_flops_counts_what_trains_and_unpacks_4bit():
    # 6 x 8 trainable + 4 x (16 + 64) frozen (the 4-bit weight at its 64, not its 32 bytes) + 6 x 2 x 100 x 16
    assert tracking.model_flops(Tiny(), 100) == 48 + 320 + 19_200


def test_rate_padding_and_mfu_leave_out_evaluation_and_saving(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 PCIe")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a: SimpleNamespace(multi_processor_count=114))
    clock = iter([0, 10, 10, 40, 50, 60, 60])  # each call of time.monotonic, in order
    monkeypatch.setattr(tracking.time, "monotonic", lambda: next(clock))
    logged = []
    run = SimpleNamespace(log=logged.append, summary={})
    speed, tracker = tracking.make_throughput(2), tracking.make_callback(run)

    def log(logs):  # as the trainer's callback handler does: one dict, to each callback in order
        for callback in (speed, tracker):
            callback.on_log(args, state, control, logs=logs)

    args, control = SimpleNamespace(bf16=True, fp16=False, max_length=100), None
    state = SimpleNamespace(global_step=1, num_input_tokens_seen=0)
    speed.on_train_begin(args, state, control, model=Tiny())  # t 0
    speed.on_step_end(args, state, control)  # t 10: 10,000 tokens trained, in 16,000 positions
    log({"loss": 1.0, "num_tokens": 10_000, "num_input_tokens_seen": 16_000})  # t 10
    log({"eval_loss": 1.0, "num_input_tokens_seen": 16_000})  # reads no clock
    speed.on_evaluate(args, state, control)  # t 40: 30 s of evaluation
    speed.on_save(args, state, control)  # t 50: 10 s of saving
    speed.on_step_end(args, state, control)  # t 60: 10 s of training, 10,000 more tokens in 12,500 positions
    log({"loss": 0.9, "num_tokens": 20_000, "num_input_tokens_seen": 28_500})  # t 60
    log({"train_loss": 0.95, "train_runtime": 60.0, "num_input_tokens_seen": 28_500})  # the closing totals
    train = [entry for entry in logged if "train/tokens_per_second" in entry]
    assert [entry["train/tokens_per_second"] for entry in train] == [1000.0, 1000.0]  # not 10,000 / 50 s
    assert not any("eval/tokens_per_second" in entry for entry in logged)
    assert train[1]["train/mfu"] == pytest.approx(19_568 * 1000 / (756e12 * 2))
    assert train[1]["train/padding_share"] == pytest.approx(0.2)  # 2,500 of 12,500
    assert train[0]["train/padding_share"] == pytest.approx(0.375)  # 6,000 of 16,000
    # the end-of-run line: 20,000 tokens in 20 s of training, 8,500 of 28,500 positions padding
    assert speed.summary() == ("speed: 1,000 non-padding tokens/s (500 per device), 29.8% of the positions "
                               f"trained were padding, MFU {19_568 * 1000 / (756e12 * 2):.1%} (NVIDIA H100 PCIe)")
