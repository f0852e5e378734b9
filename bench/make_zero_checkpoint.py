"""Run under `deepspeed --num_gpus 2`: one optimizer step of a ~374M-parameter Llama-shaped model with ZeRO-3 on
CPU, saved as a DeepSpeed checkpoint in OUT/ckpt with the model's config.json in OUT/base.

Usage: deepspeed --num_gpus 2 bench/make_zero_checkpoint.py OUT
"""

import sys
from pathlib import Path

import deepspeed
import torch
from transformers import LlamaConfig, LlamaForCausalLM

out = Path([a for a in sys.argv[1:] if not a.startswith("--local_rank")][0])
deepspeed.init_distributed(dist_backend="gloo")
world = torch.distributed.get_world_size()
ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": world,
             "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True, "steps_per_print": 1000}
# Untied embeddings: DeepSpeed's zero_to_fp32 cannot write tied ones to safetensors, and it is the baseline here.
config = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
                     num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=False)
with deepspeed.zero.Init(config_dict_or_path=ds_config):
    model = LlamaForCausalLM(config)
engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-4),
                                  config=ds_config)
ids = torch.randint(0, 32000, (1, 8))
engine.backward(engine(input_ids=ids, labels=ids).loss)
engine.step()
engine.save_checkpoint(str(out / "ckpt"))
if torch.distributed.get_rank() == 0:
    config.save_pretrained(out / "base")
torch.distributed.barrier()
