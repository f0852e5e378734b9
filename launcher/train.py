"""The training worker: one rank of a run, in stages from recipe to saved checkpoint.

Started by the real launcher as `deepspeed ... --module launcher.train RECIPE [--section.key=value ...]` (what
`launcher launch` runs; you may run it yourself), or in-process as a single rank by `launcher train RECIPE`.
"""

from __future__ import annotations

import os
import socket
import sys
import warnings
from pathlib import Path

from launcher import data, ds_config, modeling, rundir
from launcher import recipe as recipes
from launcher.consolidate import resolve_checkpoint
from launcher.errors import EXIT_BAD_INPUT, RecipeError


def run(recipe_path: str, overrides: dict) -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)  # libraries' deprecation notes, noise to users
    rank, world = distributed_env()
    try:
        _train(recipe_path, overrides, rank, world)
    except RecipeError as err:
        if rank == 0:  # every rank finds the same problem; say it once
            print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(EXIT_BAD_INPUT)


def _train(recipe_path: str, overrides: dict, rank: int, world: int) -> None:
    # --- recipe: validated and resolved exactly as `plan` did, for the world size these ranks form
    recipe = recipes.load(recipe_path, overrides)
    ds, batch = ds_config.resolve(recipe, world, recipes.model_config(recipe, recipe_path), recipe_path)
    run_dir = Path(recipe.run.output_dir)
    rundir.refuse_used(run_dir)
    if rank == 0:
        rundir.write_atomic(run_dir / "recipe.yaml", recipes.dump(recipe))
        rundir.write_atomic(run_dir / "ds_config.json", ds_config.to_json(ds))
        rundir.record_environment(run_dir)

    import deepspeed  # heavy imports only once the recipe is known to be good
    import torch
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    on_gpu = torch.cuda.is_available()
    seed = ds_config.training_value(recipe, "seed")

    # --- tokenizer and data
    tokenizer = modeling.load_tokenizer(recipe)
    train_set, eval_set = data.load(recipe, recipe_path, seed)

    # --- training arguments before the model: under ZeRO-3 the model is partitioned while it is built
    args = SFTConfig(output_dir=str(rundir.checkpoints_dir(run_dir)), deepspeed=ds, use_cpu=not on_gpu,
                     **recipe.training)
    if args.world_size != world:  # reading it joins the process group: ZeRO-3 partitions the model at build time
        raise RuntimeError(f"the trainer sees world size {args.world_size}, the launcher started {world} ranks")
    deepspeed.init_distributed()  # on CPU accelerate joins through torch alone; DeepSpeed must see that group too

    # --- model, with LoRA adapters when the recipe asks
    set_seed(seed)
    model = modeling.load_model(recipe, on_gpu)
    peft_config = modeling.lora_config(recipe, model, recipe_path)

    # --- trainer
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                         processing_class=tokenizer, peft_config=peft_config)
    if rank == 0:
        print(f"training {recipe.run.name}: {len(train_set)} rows, {batch}", flush=True)

    # --- train; the final step always writes a sharded checkpoint
    trainer.train()
    rundir.record_rank(run_dir, rank, world, trainer.model_wrapped.config)

    # --- save the loss history next to the checkpoints; rank 0 merges the shards once every rank has saved
    trainer.save_state()
    torch.distributed.barrier()
    if rank == 0:
        print(summary(trainer, run_dir), flush=True)
        if recipe.run.consolidate:
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            from launcher.consolidate import consolidate

            unset_hf_deepspeed_config()  # else building the model to merge into would start a ZeRO-3 partition
            consolidate(str(run_dir), str(run_dir / "final"), overwrite=True)  # its newest complete checkpoint


def summary(trainer, run_dir: Path) -> str:
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    lines = [f"done: {trainer.state.global_step} steps"]
    if losses:
        lines[0] += f", training loss {losses[0]:.3f} -> {losses[-1]:.3f}"
    checkpoint = resolve_checkpoint(run_dir)  # the newest complete one, as consolidation picks it
    lines += [f"run directory: {run_dir}", f"checkpoint:    {checkpoint} (ZeRO shards of every rank)"]
    return "\n".join(lines)


def distributed_env() -> tuple[int, int]:
    """(rank, world size); a process started without a launcher becomes rank 0 of 1 on a free local port."""
    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    """Entry point for `python -m launcher.train` and `deepspeed --module launcher.train`."""
    import fire

    # The deepspeed launcher inserts --local_rank=N; LOCAL_RANK in the environment says the same.
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    fire.Fire(lambda recipe, **overrides: run(recipe, overrides), command=argv, name="launcher.train")


if __name__ == "__main__":
    main()
