"""The smoke recipe written by hand: TRL's SFTTrainer under DeepSpeed ZeRO-3, without the launcher. bench/train_speed.py
times it against `launcher launch recipes/smoke.yaml`.

What a careful user writes for CPU ranks: the same model, data, split and hyperparameters as recipes/smoke.yaml (the
bench checks TRAINING against the recipe `launcher plan` resolves); a DeepSpeed config that gives the stage and
leaves the batch, clipping and precision to HF ("auto") and every other key to DeepSpeed's defaults; the world size
read and DeepSpeed's process group joined before the model is built (ZeRO-3 partitions it while it is built: else
zero.Init sees a world of 1); one thread per core share, set by whoever starts it (OMP_NUM_THREADS = cores / ranks).

Run with the real launcher, from the repository root:
    OMP_NUM_THREADS=1 deepspeed --num_gpus 2 bench/plain_trl_sft.py OUTPUT_DIR
Rank 0 prints the trainer's final metrics as one line: `metrics {"train_runtime": ...}`; trainer_state.json is in
OUTPUT_DIR too.
"""

from __future__ import annotations

import json
import sys

MODEL = "recipes/smoke/model"
DATA, EVAL = "recipes/smoke/data/train.jsonl", "recipes/smoke/data/heldout.jsonl"
SEED = 0
TRAINING = {  # recipes/smoke.yaml's training section, plus what the launcher derives for 2 ranks (global batch 32)
    "max_steps": 300, "per_device_train_batch_size": 16, "gradient_accumulation_steps": 1, "learning_rate": 3.0e-3,
    "lr_scheduler_type": "cosine", "warmup_steps": 50, "max_length": 64, "assistant_only_loss": True,
    "bf16": False, "fp16": False, "gradient_checkpointing": False, "logging_steps": 10, "eval_strategy": "steps",
    "eval_steps": 50, "per_device_eval_batch_size": 50, "save_steps": 150, "save_total_limit": 2, "seed": SEED,
}
DEEPSPEED = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto",
             "gradient_accumulation_steps": "auto", "train_batch_size": "auto", "gradient_clipping": "auto",
             "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}}


def main(output_dir: str) -> None:
    import datasets
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    train, held_out = (datasets.load_dataset("json", data_files=path, split="train") for path in (DATA, EVAL))
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    args = SFTConfig(output_dir=output_dir, deepspeed=DEEPSPEED, use_cpu=not torch.cuda.is_available(), **TRAINING)
    world = args.world_size  # joins the process group (gloo on CPU)
    # DeepSpeed builds its shared-memory C++ op at init on CPU; it serves only its inference all-reduce (training's
    # collectives go through gloo either way), and a first build costs a minute: skipped, as the launcher does.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed()  # before the model: zero.Init must see all the ranks
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, eval_dataset=held_out,
                         processing_class=tokenizer)
    trainer.train()
    trainer.save_state()
    if trainer.is_world_process_zero():
        final = trainer.state.log_history[-1]
        print("metrics " + json.dumps({"world_size": world, **final}), flush=True)


if __name__ == "__main__":
    main(next(a for a in sys.argv[1:] if not a.startswith("--local_rank")))
