"""Tokenize once: a run's data is tokenized (and packed) once, into a cache addressed by what the tokens depend on,
and every rank, start, requeue and sweep variant with the same data loads it from there.

The key is a hash of everything TRL's SFTTrainer._prepare_dataset reads: the rows themselves (their Arrow data, not
file names or times), the tokenizer (its saved files and special tokens), the chat template it applies (TRL may swap
in a training template with generation markers), the SFTConfig fields it reads (max_length, packing, ...), the split
and the versions of TRL and the tokenizer libraries. Nothing else (the learning rate, the run name) changes it.

An entry is a directory `<cache>/<split>-<key prefix>/` holding the tokenized dataset (`Dataset.save_to_disk`) and a
manifest with the full key and what it was made from; an entry whose manifest does not match is never used. Entries
are written to a temporary directory and renamed into place: a concurrent writer that loses the race drops its copy.

Two callers, one code path (`prepare`): the worker's trainer (`trainer_class`, whose `_prepare_dataset` looks in the
cache before TRL's own), and `preprocess`, which `launch` and `submit` run in the launching process before any rank
starts (and `launcher preprocess` as a step of its own), with a stand-in for the three attributes of the trainer
that TRL's data preparation reads, computed as SFTTrainer.__init__ computes them.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import secrets
import shutil
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from launcher.errors import RecipeError

LAYOUT = 1  # of the entries; a new layout is a new key
MANIFEST = "manifest.json"
RECORD = "tokenized.jsonl"  # in the run directory: a line per split and start, from cache or tokenized
DEFAULT_DIR = "tokenized"  # next to the run directory, when data.cache_dir is unset
# The SFTConfig fields that decide the tokens (what _prepare_dataset and SFTTrainer.__init__ read for it);
# dataset_num_proc too: packing works on each process's shard of the rows.
ARGS = ("max_length", "packing", "eval_packing", "packing_strategy", "padding_free", "truncation_mode",
        "completion_only_loss", "assistant_only_loss", "dataset_text_field", "shuffle_dataset", "seed", "eos_token",
        "pad_token", "dataset_num_proc", "dataset_kwargs", "chat_template_path")
VERSIONS = ("trl", "transformers", "tokenizers", "datasets")
# Saved in tokenizer_config.json, but say how it was loaded, not how it tokenizes.
LOADING = frozenset({"is_local", "local_files_only", "name_or_path", "_commit_hash", "cache_dir", "token"})
# Environment that would make accelerate's state (which TRL's data preparation opens) a process group of its own
# in the launching process: inside a Slurm step srun may set PMI_SIZE.
GROUP_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE",
             "MV2_COMM_WORLD_SIZE")


def cache_dir(recipe) -> Path:
    """data.cache_dir, else `tokenized` next to the run directory: runs, requeues and sweep variants under one
    parent share it."""
    return Path(recipe.data.cache_dir or Path(recipe.run.output_dir).parent / DEFAULT_DIR)


# --- the key ------------------------------------------------------------------------------------------------------

class _Hasher:
    """A write-only file for pyarrow that hashes what it is given."""

    def __init__(self, digest):
        self.digest, self.closed = digest, False

    def write(self, data) -> int:
        self.digest.update(data)
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def data_digest(dataset) -> str:
    """The rows' content: the Arrow table and the index mapping over it (a shuffle, a sample, a held-out split), as
    Arrow's IPC stream writes them, hashed as it writes; the features and the format. Not the tables' metadata:
    datasets keeps a fingerprint there, which follows the file's name and time."""
    import pyarrow as pa

    digest = hashlib.sha256(f"rows {len(dataset)}\n".encode())
    indices = getattr(dataset, "_indices", None)
    for name, table in (("data", dataset.data.table), ("indices", indices.table if indices is not None else None)):
        digest.update(f"{name}\n".encode())
        if table is not None:
            table = table.replace_schema_metadata(None)
            with pa.ipc.new_stream(pa.PythonFile(_Hasher(digest), mode="w"), table.schema) as writer:
                for batch in table.to_batches():
                    writer.write_batch(batch)
    described = {"features": dataset.features.to_dict(), "format": dataset.format}
    digest.update(json.dumps(described, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def tokenizer_digest(tokenizer) -> str:
    """The tokenizer as it stands (pad and eos tokens set, chat template and all): its saved files."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    with tempfile.TemporaryDirectory(prefix="launcher-tokenizer-") as saved:
        tokenizer.save_pretrained(saved)
        for path in sorted(p for p in Path(saved).rglob("*") if p.is_file()):
            content = path.read_bytes()
            if path.name == "tokenizer_config.json":
                config = {k: v for k, v in json.loads(content).items() if k not in LOADING}
                content = json.dumps(config, sort_keys=True, default=str).encode()
            digest.update(f"\n{path.relative_to(saved)} {len(content)}\n".encode() + content)
    return digest.hexdigest()


def key_fields(owner, dataset, tokenizer, args, packing: bool, split: str) -> dict[str, Any]:
    """Everything the tokens of `split` depend on, as plain JSON values. owner: the trainer, or the stand-in."""
    template = owner.chat_template
    fields = {
        "layout": LAYOUT, "split": split, "rows": data_digest(dataset), "row_count": len(dataset),
        "tokenizer": tokenizer_digest(tokenizer),
        "special_tokens": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "eos_token": str(owner._tokenizer.eos_token), "pad_token": str(owner._tokenizer.pad_token),
        "chat_template": None if template is None else hashlib.sha256(template.encode()).hexdigest(),
        "completion_only_loss": bool(owner.completion_only_loss), "packing": bool(packing),
        "args": {name: getattr(args, name, None) for name in ARGS},
        "versions": {name: _version(name) for name in VERSIONS},
    }
    return json.loads(json.dumps(fields, sort_keys=True, default=str))  # as a manifest reads back


def key_of(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def entry_dir(cache: Path, fields: dict[str, Any]) -> Path:
    return cache / f"{fields['split']}-{key_of(fields)[:24]}"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


# --- the cache ----------------------------------------------------------------------------------------------------

def lookup(cache: Path, fields: dict[str, Any]):
    """The tokenized dataset for these fields, or None: no entry, or one whose manifest does not hold exactly this
    key and these fields (edited, damaged, another tokenizer's), or whose data does not load."""
    import datasets

    entry = entry_dir(cache, fields)
    try:
        manifest = json.loads((entry / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("key") != key_of(fields) or manifest.get("fields") != fields:
        return None
    try:
        loaded = datasets.load_from_disk(str(entry / "data"))
    except Exception:  # datasets raises several kinds for missing or damaged files: the entry is not usable
        return None
    return loaded if len(loaded) == manifest.get("tokenized_rows") else None


def store(cache: Path, fields: dict[str, Any], dataset, rows: int) -> Path:
    """Write the entry: into a temporary directory, then renamed into place. If another writer got there first with
    a good entry, ours is dropped; an entry that does not match its key is replaced."""
    entry = entry_dir(cache, fields)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".tmp-{entry.name}-{secrets.token_hex(4)}"
    try:
        dataset.save_to_disk(str(tmp / "data"))
        manifest = {"key": key_of(fields), "fields": fields, "rows": rows, "tokenized_rows": len(dataset),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname()}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        try:
            os.rename(tmp, entry)
            return entry
        except OSError:  # there is an entry already
            if lookup(cache, fields) is not None:  # a concurrent writer's, as good as ours
                return entry
        stale = cache / f".stale-{entry.name}-{secrets.token_hex(4)}"
        with contextlib.suppress(FileNotFoundError):
            os.rename(entry, stale)
        with contextlib.suppress(OSError):  # another writer replaced it in between: theirs stays
            os.rename(tmp, entry)
        shutil.rmtree(stale, ignore_errors=True)
        if stale.exists():  # a file, not a directory
            stale.unlink(missing_ok=True)
        return entry
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_writable(cache: Path, recipe_where: str) -> None:
    try:
        cache.mkdir(parents=True, exist_ok=True)
        probe = cache / f".probe-{secrets.token_hex(4)}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise RecipeError(f"{recipe_where}: data.cache_dir {cache} (where tokenized data is kept) cannot be written: "
                          f"{err.strerror or err}; set data.cache_dir to a directory you can write") from None


def record(run_dir: Path | None, line: dict[str, Any]) -> None:
    """One line in the run directory's tokenized.jsonl: which split, from the cache or tokenized, by whom."""
    if run_dir is None:
        return
    line = {**line, "restart": int(os.environ.get("SLURM_RESTART_COUNT") or 0),
            "job": os.environ.get("SLURM_JOB_ID"), "host": socket.gethostname(), "pid": os.getpid(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / RECORD, "a", encoding="utf-8") as f:  # one short write: appends do not interleave
        f.write(json.dumps(line) + "\n")


# --- the one code path: the trainer's and preprocess's --------------------------------------------------------------

def prepare(owner, dataset, tokenizer, args, packing: bool, split: str, tokenize: Callable[[], Any], cache: Path,
            run_dir: Path | None, by: str):
    """The tokenized `split`: from the cache when every rank finds it there, else tokenize() (TRL's own
    preparation; every rank runs it, for its barriers), which the global main process then stores."""
    import datasets

    if not isinstance(dataset, datasets.Dataset):  # a streamed dataset: nothing to hash, nothing to keep
        return tokenize()
    rank, world = _rank_world()
    fields = key_fields(owner, dataset, tokenizer, args, packing, split)
    entry, found = entry_dir(cache, fields), lookup(cache, fields)
    if _everyone(found is not None, key_of(fields), world):
        if rank == 0:
            print(f"data: {split} set tokenized from cache {entry}", flush=True)
            record(run_dir, {"split": split, "from_cache": True, "entry": str(entry), "rows": len(dataset),
                             "tokenized_rows": len(found), "by": by})
        return found
    if rank == 0:
        print(f"tokenizing {split} set: {len(dataset)} rows, cached at {entry}", flush=True)
    result = tokenize()
    if rank == 0:
        try:
            store(cache, fields, result, len(dataset))
        except OSError as err:
            if by == "preprocess":
                raise RecipeError(f"data.cache_dir {cache}: the tokenized {split} set could not be written there: "
                                  f"{err.strerror or err}; set data.cache_dir to a directory you can write") from None
            print(f"warning: the tokenized {split} set could not be cached in {cache} ({err.strerror or err}); the "
                  "next start tokenizes it again", flush=True)
        record(run_dir, {"split": split, "from_cache": False, "entry": str(entry), "rows": len(dataset),
                         "tokenized_rows": len(result), "by": by})
    return result


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _everyone(found: bool, key: str, world: int) -> bool:
    """Whether every rank found the same entry: they must all take the same path, TRL's has barriers inside."""
    if world == 1:
        return found
    import torch.distributed as dist

    views: list = [None] * world
    dist.all_gather_object(views, (found, key))
    return all(ok for ok, _ in views) and len({k for _, k in views}) == 1


@functools.cache
def trainer_class():
    """TRL's SFTTrainer, whose data preparation goes through the cache (under TRL's class name: reports show it)."""
    import trl

    class SFTTrainer(trl.SFTTrainer):
        def __init__(self, *args, tokenized_cache: Path, run_dir: Path | None = None, questions=None,
                     samples: Path | None = None, **kwargs):
            """questions: (asked, max_new_tokens) for the answers' scores at each evaluation (run.eval_answers);
            samples: the file this rank records its rows in (run.log_samples)."""
            self._tokenized_cache, self._tokenized_run_dir = Path(tokenized_cache), run_dir
            self._questions, self._samples = questions, samples
            super().__init__(*args, **kwargs)

        def training_step(self, model, inputs, *args, **kwargs):
            if self._samples is not None:
                record_rows(self._samples, self.state.global_step + 1, inputs)
            return super().training_step(model, inputs, *args, **kwargs)

        def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                            metric_key_prefix="eval"):
            """The eval loss and TRL's metrics, then the answers' exact match and token F1, logged with them."""
            output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                             metric_key_prefix)
            if self._questions and description == "Evaluation":
                import torch

                from launcher import answers

                with torch.no_grad():
                    scored = answers.scores_across_ranks(self.model, self.processing_class, self._questions[0],
                                                         self.args.per_device_eval_batch_size, self._questions[1])
                output.metrics.update({f"{metric_key_prefix}_{key}": value for key, value in scored.items()})
            return output

        def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
            tokenize = functools.partial(super()._prepare_dataset, dataset, processing_class, args, packing,
                                         formatting_func, dataset_name)
            if formatting_func is not None:  # a function's effect cannot be hashed; the launcher passes none
                return tokenize()
            return prepare(self, dataset, processing_class, args, packing, dataset_name, tokenize,
                           self._tokenized_cache, self._tokenized_run_dir, "worker")

    return SFTTrainer


def record_rows(path: Path, step: int, inputs) -> None:
    """One line per micro-batch: the step it trains and a hash of each row's tokens (those the attention mask keeps),
    the same for a row whichever rank or batch it lands in."""
    ids, mask = inputs["input_ids"], inputs.get("attention_mask")
    rows = [(row if mask is None else row[mask[i].bool()]).cpu().numpy().tobytes() for i, row in enumerate(ids)]
    hashes = [hashlib.blake2b(r, digest_size=8).hexdigest() for r in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps({"step": step, "rows": hashes}) + "\n")


# --- preprocess: the same, in the launching process, before any rank starts ----------------------------------------

@dataclass
class StandIn:
    """What TRL's _prepare_dataset reads from its trainer, computed as SFTTrainer.__init__ computes it."""

    _tokenizer: Any
    chat_template: str | None
    completion_only_loss: bool


def stand_in(tokenizer, args, train_set, where: str) -> StandIn | None:
    """The trainer's attributes, and the tokenizer changed as SFTTrainer.__init__ changes it before preparing the
    data (eos, chat template file, pad token). None when that needs the model: a chat template cloned from another
    tokenizer (training.chat_template_path naming one) resizes its embeddings."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers
    from trl.data_utils import is_conversational

    if args.eos_token is not None:
        if args.eos_token not in tokenizer.get_vocab():
            raise RecipeError(f"{where}: training.eos_token {args.eos_token!r} is not in the tokenizer's vocabulary")
        tokenizer.eos_token = args.eos_token
    if args.chat_template_path is not None:
        path = args.chat_template_path
        if not (os.path.isfile(path) and path.endswith((".jinja", ".j2"))):
            return None
        with open(path, encoding="utf-8") as f:
            tokenizer.chat_template = f.read()
    sample = next(iter(train_set))
    if args.assistant_only_loss and not is_conversational(sample):
        raise RecipeError(f"{where}: training.assistant_only_loss is true, but the training rows are not chat "
                          "messages; set training.assistant_only_loss: false")
    if args.assistant_only_loss and not has_generation_markers(tokenizer.chat_template):
        template = get_training_chat_template(tokenizer)
    else:
        template = None
    completion_only = (("prompt" in sample and "completion" in sample) if args.completion_only_loss is None
                       else args.completion_only_loss)
    pad = args.pad_token or tokenizer.pad_token or tokenizer.eos_token
    if pad not in tokenizer.get_vocab():
        raise RecipeError(f"{where}: the pad token {pad!r} is not in the tokenizer's vocabulary; set "
                          "training.pad_token to one of its tokens")
    tokenizer.pad_token = pad
    return StandIn(tokenizer, template, completion_only)


@contextlib.contextmanager
def _one_process():
    """accelerate's state for this one process, whatever the environment says (TRL's preparation opens it)."""
    from accelerate import PartialState

    if not PartialState._shared_state:  # not opened yet in this process
        saved = {k: os.environ.pop(k) for k in GROUP_ENV if k in os.environ}
        try:
            PartialState(cpu=True)
        finally:
            os.environ.update(saved)
    yield


@dataclass
class Inputs:
    """What the ranks' trainer would prepare, as it would: its stand-in, tokenizer, arguments and splits."""

    owner: StandIn
    tokenizer: Any
    args: Any
    splits: list[tuple[str, Any, bool]]  # (name, rows, packing)


def inputs(run, where: str, required: bool = True) -> Inputs | None:
    """The tokenizer and data loaded, and the template checked, as the worker's build does; the training arguments
    that decide the tokens; the stand-in. None, having said why in one line, when there is nothing to do here."""
    from launcher import data, ds_config, modeling, preflight
    from launcher.train import training_arguments

    recipe = run.recipe
    hub = [ref for ref in (recipe.model.tokenizer or recipe.model.name_or_path,) if not Path(ref).is_dir()]
    hub += [spec.path for spec in [*recipe.data.train, *recipe.data.eval] if not data.is_local(spec)]
    import warnings

    from transformers.utils import logging
    from trl import SFTConfig

    warnings.filterwarnings("ignore", category=FutureWarning)  # libraries' deprecation notes, noise to users
    logging.set_verbosity_error()
    with _one_process():
        try:
            tokenizer = modeling.load_tokenizer(recipe)
            loaded: list = []
            train_set, eval_set = data.load(recipe, where, ds_config.training_value(recipe, "seed"), loaded=loaded)
        except Exception as err:
            if hub and not required:
                print(f"data: not tokenized here ({data.reason(err)}); the ranks tokenize it", flush=True)
                return None
            if isinstance(err, RecipeError):
                raise
            raise RecipeError(f"{where}: the tokenizer or the data could not be loaded here: {data.reason(err)}"
                              ) from None
        preflight.check_template(recipe, where, tokenizer, loaded)  # as the worker's build: it sets the template
        training = training_arguments(recipe, ds_config.zero_stage(run.plan.ds_config, recipe.deepspeed.config))
        with tempfile.TemporaryDirectory(prefix="launcher-preprocess-") as scratch:
            args = SFTConfig(output_dir=scratch, use_cpu=True, report_to="none",
                             **{k: v for k, v in training.items() if k in ARGS})
    if (args.dataset_kwargs or {}).get("skip_prepare_dataset"):
        print("data: training.dataset_kwargs.skip_prepare_dataset is set: TRL prepares nothing; nothing to tokenize",
              flush=True)
        return None
    owner = stand_in(tokenizer, args, train_set, where)
    if owner is None:
        print("data: not tokenized here: training.chat_template_path names a tokenizer to clone the template from, "
              "which changes the model too; the ranks tokenize it (into the cache)", flush=True)
        return None
    eval_packing = args.packing if args.eval_packing is None else args.eval_packing
    splits = [("train", train_set, args.packing), *([("eval", eval_set, eval_packing)] if eval_set is not None else [])]
    return Inputs(owner, tokenizer, args, splits)


def preprocess(run, where: str, required: bool = True) -> None:
    """Tokenize (and pack) the run's data into the cache, here, as its ranks would. required (`launcher
    preprocess`): problems are errors; for launch and submit, a hub dataset or tokenizer this machine cannot load
    is left to the ranks, as before."""
    recipe = run.recipe
    if recipe.task != "sft":
        if required:
            print(f"preprocess: task {recipe.task} tokenizes in its trainer, on the ranks; nothing to do here",
                  flush=True)
        return
    cache = cache_dir(recipe)
    check_writable(cache, where)
    if (got := inputs(run, where, required)) is None:
        return
    for split, rows, packing in got.splits:
        try:
            with _one_process(), _progress_bars():
                prepare_here(got.owner, rows, got.tokenizer, got.args, packing, split, cache, run.run_dir)
        except RecipeError:
            raise
        except Exception as err:  # as a rank reports it: one line, the traceback in the run directory
            from launcher import rundir

            saved = run.run_dir / f"preprocess-{split}.traceback"
            rundir.write_atomic(saved, traceback.format_exc())
            first = (str(err).strip().splitlines() or [""])[0][:300]
            print(f"error: tokenizing the {split} set failed: {type(err).__name__}: {first} [traceback: {saved}]",
                  file=sys.stderr, flush=True)
            sys.exit(1)


def prepare_here(owner: StandIn, rows, tokenizer, args, packing: bool, split: str, cache: Path,
                 run_dir: Path | None):
    """`prepare` in this one process, outside any trainer: TRL's own preparation with the stand-in as its trainer."""
    from trl import SFTTrainer

    tokenize = functools.partial(SFTTrainer._prepare_dataset, owner, rows, tokenizer, args, packing, None, split)
    return prepare(owner, rows, tokenizer, args, packing, split, tokenize, cache, run_dir, "preprocess")


@contextlib.contextmanager
def _progress_bars():
    """datasets' progress bars while tokenizing, which can take long (the pre-flight check turned them off)."""
    import datasets

    was = datasets.is_progress_bar_enabled()
    datasets.enable_progress_bars()
    try:
        yield
    finally:
        if not was:
            datasets.disable_progress_bars()
