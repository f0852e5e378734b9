"""Run under `deepspeed --num_gpus 2`: train a small odd-sized Llama with tied embeddings and a frozen layer for two
steps with ZeRO-STAGE, save a DeepSpeed checkpoint, and dump the live engine's fp32 weights (gathered with
deepspeed.zero.GatheredParameters) as the ground truth for consolidation.

Usage: deepspeed --num_gpus 2 tests/integration/zero_engine_dump.py STAGE OUT_DIR
"""

import sys
from pathlib import Path

import deepspeed
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
stage, out = int(args[0]), Path(args[1])
deepspeed.init_distributed(dist_backend="gloo")
rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
ds_config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_batch_size": 2 * world,
             "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True, "steps_per_print": 1000}
# Odd sizes make every partition uneven; tied embeddings and a frozen matrix are the cases consolidation gets wrong.
config = LlamaConfig(vocab_size=97, hidden_size=36, intermediate_size=61, num_hidden_layers=2, num_attention_heads=3,
                     num_key_value_heads=1, head_dim=12, tie_word_embeddings=True, max_position_embeddings=64)
torch.manual_seed(0)
with deepspeed.zero.Init(config_dict_or_path=ds_config, enabled=stage == 3):
    model = LlamaForCausalLM(config)
model.model.layers[0].mlp.down_proj.weight.requires_grad_(False)
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
generator = torch.Generator().manual_seed(rank)
for _ in range(2):
    ids = torch.randint(0, 97, (2, 16), generator=generator)
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
engine.save_checkpoint(str(out / "ckpt"))
with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None, enabled=stage == 3):
    live = {n: p.detach().clone().float().contiguous() for n, p in engine.module.named_parameters()}
if rank == 0:
    config.save_pretrained(out / "base")
    save_file(live, str(out / "live.safetensors"))
torch.distributed.barrier()
