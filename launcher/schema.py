"""The recipe schema: one dataclass per YAML section, a doc and a check on every field.

Precedence, highest first: command-line overrides (`--training.learning_rate=1e-5`), then the recipe file, then
the defaults written here (for `training`, the defaults of TRL's SFTConfig). A recipe is data: no interpolation,
no inheritance. Unknown keys, wrong types and out-of-range values are errors that name the key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from launcher import sft_fields
from launcher.errors import RecipeError


def doc(text: str, check=None, default=dataclasses.MISSING, factory=dataclasses.MISSING, identity: bool = True,
        convert=None):
    """A dataclass field carrying its one-line doc, an optional (predicate, message) check, whether it identifies the
    experiment (identity=False: a resumed run may change it) and an optional converter of its raw YAML value."""
    return field(default=default, default_factory=factory,
                 metadata={"doc": text, "check": check, "identity": identity, "convert": convert})


POSITIVE = (lambda v: v > 0, "must be > 0")
FRACTION = (lambda v: 0 <= v < 1, "must be in [0, 1)")
NON_NEGATIVE = (lambda v: v >= 0, "must be >= 0")


@dataclass
class RunSection:
    name: str = doc("Run name: names the run directory and the W&B run.", identity=False)
    output_dir: str | None = doc("Run directory; default runs/<name>. Checkpoints go under it.", default=None)
    global_batch_size: int | None = doc("Fix the global batch; gradient accumulation is then derived per world size.",
                                        POSITIVE, default=None)
    consolidate: bool = doc("When training ends, merge the last checkpoint into <run dir>/final (a HF model).",
                            default=True, identity=False)
    score_answers: int = doc("When training ends, the consolidated model answers the first N eval rows (greedy, "
                             "batched, as `launcher evaluate` does) and the answers are scored against the "
                             "references: exact match and token F1, printed with three examples and written to "
                             "final/metrics-eval.json. SFT only, with an eval set; 0: off.", NON_NEGATIVE, default=0,
                             identity=False)
    eval_answers: int = doc("At each evaluation during training, the model also answers the first N eval rows "
                            "(greedy, shared out between the ranks) and eval_exact_match and eval_f1 are logged with "
                            "eval_loss: in W&B, curves.png and sweep reports. SFT only, with an eval set and "
                            "training.eval_strategy; 0: off.", NON_NEGATIVE, default=0, identity=False)
    log_samples: bool = doc("Each rank appends which rows it trained on at each step (a hash of each row's tokens) "
                            "to <run dir>/logs/samples-rank<R>.jsonl: what a resumed run saw, row by row. SFT only.",
                            default=False, identity=False)
    resume: str = doc("For the first start only: auto continues from the run directory's newest complete checkpoint; "
                      "never refuses a run directory that holds checkpoints; or the path of a checkpoint to start "
                      "from. Once the run has checkpoints of its own (a requeue, a resubmit), it continues from its "
                      "newest complete one.", default="auto", identity=False)


@dataclass
class ModelSection:
    name_or_path: str = doc("Local model directory or hub id.")
    config: str | None = doc("Local config.json, for `plan` when name_or_path is a hub id.", default=None)
    tokenizer: str | None = doc("Tokenizer directory or hub id; default: name_or_path.", default=None)
    init: Literal["pretrained", "random"] = doc(
        "pretrained: load weights; random: build from config.json (tiny test models).", default="pretrained")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = doc("Weights dtype when loading.", default="auto")
    attn_implementation: str | None = doc("eager, sdpa, flash_attention_2, ...; default: transformers'.", default=None)
    trust_remote_code: bool = doc("Run modelling code shipped with the model. Off unless you trust it.", default=False)


@dataclass
class DatasetSpec:
    path: str = doc("Local .json/.jsonl/.parquet/.csv file or hub id.")
    split: str = doc("Split to read (hub datasets).", default="train")
    subset: str | None = doc("Hub dataset configuration name.", default=None)
    weight: float = doc("Share of this dataset's rows to use: 0.5 = half, 2 = every row twice.", POSITIVE, default=1.0)
    columns: dict[str, str] = doc(
        "Rename columns to the expected ones: {messages: conversations} reads `conversations` as `messages`.",
        factory=dict)


@dataclass
class DataSection:
    train: list[DatasetSpec] = doc("Training datasets; rows are chat `messages`, `prompt`/`completion` or `text`.")
    eval: list[DatasetSpec] = doc("Evaluation datasets; when empty, eval_fraction of train is held out.", factory=list)
    eval_fraction: float = doc("Share of training rows held out for evaluation when no eval set is given.",
                               FRACTION, default=0.0)
    cache_dir: str | None = doc("Where the data is kept tokenized (and packed), by content, for every start, requeue "
                                "and sweep variant to share; default: <parent of run.output_dir>/tokenized.",
                                default=None, identity=False, convert=lambda raw, where: _directory(raw, where))


def _directory(raw: Any, where: str) -> str | None:
    """data.cache_dir: a path, made absolute (the ranks and the Slurm job run the resolved recipe from elsewhere)."""
    if raw is None:
        return None
    value = scalar(str, raw, where, "data.cache_dir")
    if not value.strip():
        fail(where, "data.cache_dir", "is empty; give a directory, or leave it unset for the default")
    return str(Path(value).expanduser().absolute())


@dataclass
class LoraSection:
    r: int = doc("LoRA rank.", POSITIVE, default=16)
    alpha: int = doc("LoRA alpha (scaling = alpha / r).", POSITIVE, default=32)
    dropout: float = doc("Dropout on the LoRA path.", FRACTION, default=0.05)
    target_modules: list[str] | str = doc("Module names to adapt, or `all-linear`.", default="all-linear")
    modules_to_save: list[str] = doc("Modules trained in full and saved with the adapter (e.g. lm_head).",
                                     factory=list)
    quantize: Literal["none", "4bit", "8bit"] = doc("QLoRA: load the base model quantised (CUDA only).",
                                                    default="none")


@dataclass
class DeepSpeedSection:
    config: str = doc("DeepSpeed JSON template: a shipped one by name (zero2, zero3, zero3_offload) or a path to a "
                      "JSON file. Where it lives does not identify the run (a resume from another checkout or install "
                      "finds it elsewhere); its stage must match the checkpoint's.", default="zero3", identity=False)
    overrides: dict[str, Any] = doc("Keys merged over the template, nested as in the JSON.", factory=dict)


SLURM_TIME = (lambda v: re.fullmatch(r"(\d+-)?\d+(:\d{2}){0,2}", v) is not None,
              "must be a Slurm time: MM, HH:MM:SS or D-HH:MM:SS")


@dataclass
class SlurmSection:
    nodes: int = doc("Nodes to allocate (`submit --nodes`).", POSITIVE, default=1)
    gpus_per_node: int | None = doc("GPUs, hence ranks, per node (`submit --gpus_per_node`); on a cluster without "
                                    "GPUs, CPU ranks per node.", POSITIVE, default=None)
    partition: str | None = doc("Partition (`--partition`).", default=None)
    time: str | None = doc("Time limit (`--time`), e.g. 04:00:00 or 2-00:00:00.", SLURM_TIME, default=None)
    account: str | None = doc("Account to charge (`--account`).", default=None)
    qos: str | None = doc("Quality of service (`--qos`).", default=None)
    constraint: str | None = doc("Node features (`--constraint`).", default=None)
    exclusive: bool = doc("Whole nodes only (`--exclusive`).", default=False)
    signal_grace: int = doc("Seconds before the time limit at which the job checkpoints and requeues itself; "
                            "0: never.", NON_NEGATIVE, default=300)
    sbatch: list[str] = doc("More sbatch options, as on the command line: ['--mem=0', '--gres=gpu:8'].",
                            factory=list)
    setup: list[str] = doc("Shell lines run on the first node before training: module load, source venv, ...",
                           factory=list)


@dataclass
class WandbSection:
    project: str | None = doc("W&B project; default: $WANDB_PROJECT, else wandb.group (a sweep's name), else "
                              "run.name.", default=None)
    entity: str | None = doc("Team or user; default: your W&B default.", default=None)
    name: str | None = doc("Run name; default: run.name plus the Slurm job id or a timestamp.", default=None)
    group: str | None = doc("Group runs together (sweeps, ablations).", default=None)
    tags: list[str] = doc("Tags.", factory=list)
    notes: str | None = doc("Free text shown with the run.", default=None)
    mode: Literal["online", "offline", "disabled"] = doc(
        "online needs WANDB_API_KEY or `wandb login`; offline writes files to upload later with `wandb sync`.",
        default="online")
    log_model: bool = doc("Upload the consolidated model as an artifact (can be large).", default=False)


@dataclass
class HeadSection:
    labels: list[str] = doc("classification: the label names, in id order; rows give a name or an id. "
                            "token_classification: the tags, e.g. [O, B-PER, I-PER]. Kept in the model's config "
                            "(id2label).", factory=list)
    class_weights: list[float] | Literal["balanced"] | None = doc(
        "classification: loss weight per label (in label order), or balanced (inverse label frequency in the "
        "training rows); default: none.", default=None)
    stride: int | None = doc("question_answering: tokens that consecutive windows of a long context share (a "
                             "context longer than training.max_length is read in windows); default: a quarter of "
                             "max_length.", POSITIVE, default=None)


@dataclass
class FreezeSection:
    embeddings: bool = doc("Freeze the embeddings (token, position, type).", default=False)
    all_but_last: int | None = doc("Freeze the embeddings and every transformer layer except the last K.",
                                   NON_NEGATIVE, default=None)
    patterns: list[str] = doc("Freeze parameters whose names match these globs, e.g. '*.attention.*'.",
                              factory=list)


@dataclass
class Recipe:
    run: RunSection = doc("Name and place of the run.")
    model: ModelSection = doc("What to fine-tune.")
    data: DataSection = doc("What to train and evaluate on.")
    task: Literal["sft", "classification", "regression", "token_classification", "question_answering"] = doc(
        "sft: chat/completion SFT with TRL's SFTTrainer. The others put a new head on the model, trained with the HF "
        "Trainer: classification or regression (rows: text + label), token_classification (rows: tokens + tags, or "
        "text + spans), question_answering (extractive; rows: question, context, answers as in SQuAD).",
        default="sft")
    head: HeadSection = doc("Labels and class weights of the head.", factory=HeadSection)
    freeze: FreezeSection | None = doc("Parameters kept frozen; the task's head always trains. Absent = none.",
                                       default=None)
    training: dict[str, Any] = doc("TRL SFTConfig arguments, by their SFTConfig names (`launcher keys training`).",
                                   factory=dict, convert=lambda raw, where: training_args(raw, where))
    deepspeed: DeepSpeedSection = doc("ZeRO configuration.", factory=DeepSpeedSection)
    lora: LoraSection | None = doc("Parameter-efficient fine-tuning; absent = full fine-tune.", default=None)
    slurm: SlurmSection = doc("Cluster job options for `launcher submit`.", factory=SlurmSection, identity=False)
    wandb: WandbSection | None = doc("Weights & Biases tracking; absent = none.", default=None, identity=False)


# --- conversion of plain YAML data into the dataclasses above, strictly -------------------------------------------


def build(cls: Any, data: Any, where: str, path: str = "") -> Any:
    """Convert `data` (parsed YAML) into the type `cls`, raising RecipeError naming `where` and the dotted key."""
    origin, args = typing.get_origin(cls), typing.get_args(cls)
    if dataclasses.is_dataclass(cls):
        return _build_dataclass(cls, data, where, path)
    if origin in (typing.Union, types.UnionType):
        if data is None and type(None) in args:
            return None
        errors = []
        for member in (a for a in args if a is not type(None)):
            try:
                return build(member, data, where, path)
            except RecipeError as err:
                errors.append(err)
        raise errors[0]
    if origin is Literal:
        if data in args:
            return data
        fail(where, path, f"is {data!r}; must be one of {', '.join(map(str, args))}")
    if origin is list:
        if not isinstance(data, list):
            fail(where, path, f"must be a list, got {_kind(data)}")
        return [build(args[0], v, where, f"{path}.{i}") for i, v in enumerate(data)]
    if origin is dict or cls is dict:
        if not isinstance(data, dict):
            fail(where, path, f"must be a mapping, got {_kind(data)}")
        return dict(data)
    return data if cls is Any else scalar(cls, data, where, path)


def _build_dataclass(cls: type, value: Any, where: str, path: str) -> Any:
    value = {} if value is None else value
    if not isinstance(value, dict):
        fail(where, path, f"must be a mapping of keys, got {_kind(value)}")
    fields, hints = {f.name: f for f in dataclasses.fields(cls)}, typing.get_type_hints(cls)
    for key in value:
        if key not in fields:
            fail(where, f"{path}.{key}" if path else str(key), "is not a known key" + did_you_mean(key, fields))
    kwargs = {}
    for name, f in fields.items():
        key = f"{path}.{name}" if path else name
        if name in value:
            convert = f.metadata.get("convert")
            raw = convert(value[name], where) if convert else build(hints[name], value[name], where, key)
            kwargs[name] = _checked(f.metadata.get("check"), raw, where, key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            fail(where, key, "is required")
    return cls(**kwargs)


def _checked(check: tuple | None, value: Any, where: str, path: str) -> Any:
    if check and value is not None and not check[0](value):
        fail(where, path, f"is {value!r}; {check[1]}")
    return value


def scalar(tp: type, value: Any, where: str, path: str) -> Any:
    """Convert one scalar; strings from YAML or the command line are parsed, never guessed."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    try:
        if tp is bool and (isinstance(value, bool) or str(value).lower() in ("true", "false")):
            return value if isinstance(value, bool) else value.lower() == "true"
        if tp is int and ((number and (isinstance(value, int) or value.is_integer())) or isinstance(value, str)):
            return int(value)
        if tp is float and (number or isinstance(value, str)):  # PyYAML reads 1e-5 (no dot) as a string
            return float(value)
        if tp is str and (isinstance(value, str) or number):
            return str(value)
    except ValueError:
        pass
    fail(where, path, f"must be {tp.__name__}, got {_kind(value)} {value!r}")


# --- the `training` section: SFTConfig's own fields, read from TRL's source without importing it ------------------

# Set by the launcher from other sections; a recipe setting them would be ignored or conflict.
LAUNCHER_OWNED = {"output_dir": "the run directory is run.output_dir",
                  "deepspeed": "the ZeRO config is deepspeed.config (and deepspeed.overrides)",
                  "use_cpu": "the launcher sets it when there is no GPU", "local_rank": "the launcher sets it",
                  "run_name": "the W&B run name is wandb.name"}

TRAINING_CHECKS = {"max_steps": (lambda v: v == -1 or v > 0, "must be -1 (use epochs) or > 0"),
                   "weight_decay": NON_NEGATIVE, "max_grad_norm": NON_NEGATIVE,
                   **dict.fromkeys(("per_device_train_batch_size", "per_device_eval_batch_size", "learning_rate",
                                    "gradient_accumulation_steps", "num_train_epochs", "max_length", "logging_steps",
                                    "save_steps", "eval_steps"), POSITIVE)}


def training_args(raw: Any, where: str) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        fail(where, "training", f"must be a mapping of SFTConfig arguments, got {_kind(raw)}")
    known, out = sft_fields.fields(), {}
    for key, value in raw.items():
        path = f"training.{key}"
        if key in LAUNCHER_OWNED:
            fail(where, path, f"is set by the launcher: {LAUNCHER_OWNED[key]}")
        if key not in known:
            fail(where, path, "is not an SFTConfig argument" + did_you_mean(key, known))
        value = _training_value(known[key].kinds, value, where, path)
        out[key] = _checked(TRAINING_CHECKS.get(key), value, where, path)
    return out


def _training_value(kinds: frozenset[str], value: Any, where: str, path: str) -> Any:
    if value is None and "none" in kinds:
        return None
    for tp in (t for t in (bool, int, float, str) if t.__name__ in kinds):
        with contextlib.suppress(RecipeError):
            return scalar(tp, value, where, path)
    if ("list" in kinds and isinstance(value, list)) or ("dict" in kinds and isinstance(value, dict)):
        return value
    fail(where, path, f"must be {' or '.join(sorted(kinds))}, got {_kind(value)} {value!r}")


# --- resume identity: which keys a continued run may change -------------------------------------------------------

# `training` keys that say how a run is logged, saved, evaluated or fed, not what it learns.
TRAINING_NOT_IDENTITY = frozenset({
    "logging_steps", "logging_strategy", "logging_first_step", "logging_nan_inf_filter", "log_level", "report_to",
    "disable_tqdm", "save_steps", "save_strategy", "save_total_limit", "eval_steps", "eval_strategy", "eval_delay",
    "eval_on_start", "per_device_eval_batch_size", "dataloader_num_workers", "dataloader_pin_memory",
    "dataloader_persistent_workers", "dataloader_prefetch_factor", "ddp_timeout", "include_num_input_tokens_seen",
    "gradient_accumulation_steps",  # derived per world size; the gate checks the global batch (pipeline.world_changed)
})
GROW_ONLY = frozenset({"training.max_steps", "training.num_train_epochs"})  # a longer run continues; a shorter no


def identifies(dotted: str) -> bool:
    """Whether a recipe key identifies the experiment: a resumed run refuses a change to it."""
    if dotted in GROW_ONLY:
        return False
    if dotted.startswith("training."):
        return dotted.split(".")[1] not in TRAINING_NOT_IDENTITY
    cls: Any = Recipe
    for part in dotted.split("."):
        fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
        if part not in fields:
            return True
        if not fields[part].metadata.get("identity", True):
            return False
        tp = typing.get_type_hints(cls)[part]  # the section inside `X | None` or `list[X]`, else None
        cls = next((a for a in (tp, *typing.get_args(tp)) if dataclasses.is_dataclass(a)), None)
    return True


def fail(where: str, path: str, message: str) -> typing.NoReturn:
    raise RecipeError(f"{where}: {path or 'recipe'} {message}")


def did_you_mean(key: str, choices) -> str:
    if close := difflib.get_close_matches(key, list(choices), n=1, cutoff=0.6):
        return f" (did you mean '{close[0]}'?)"
    return f" (valid: {', '.join(sorted(choices))})" if len(choices) <= 12 else ""


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", type(None): "nothing"}.get(type(value), type(value).__name__)
