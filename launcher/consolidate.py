"""`consolidate`: a sharded ZeRO checkpoint (full or LoRA) becomes one ready-to-serve Hugging Face model directory.

Full fine-tunes stream: each tensor's values are copied from the rank files (read in place, through a small buffer;
launcher/zero_checkpoint.py), cast on the way if needed, into its output shard (launcher/safetensors_stream.py), a few
shards at a time, so memory holds a few small buffers, not a model, a shard or even a tensor.
LoRA runs stream too: each base tensor is read from the base model's memory-mapped safetensors, the adapter's
product added, cast and written (memory: a tensor per shard being written); the adapter is kept beside the merged
model. Everything is checked before anything is written, and written into a temporary directory that is fsynced and
renamed into place at the end. OUTPUT never overlaps the checkpoint it is built from.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from launcher import checkpoints, memory, model_card
from launcher.errors import RecipeError
from launcher.modeling import auto_class, auto_class_for, is_classifier, stop_at_end_of_turn
from launcher.safetensors_stream import write_model
from launcher.zero_checkpoint import ZeroCheckpoint

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "vocab.json", "vocab.txt", "merges.txt",
                   "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")


def consolidate(checkpoint: str, output: str, dtype: str | None = None, max_shard_size: str = "5GB",
                base_model: str | None = None, overwrite: bool = False, progress=print) -> Path:
    """Build OUTPUT from CHECKPOINT (an HF checkpoint-N, a bare DeepSpeed dir, or a run directory)."""
    source = resolve_checkpoint(Path(checkpoint))
    out = Path(output).resolve()  # a symlinked OUTPUT: the directory it names is replaced, the link kept
    check_apart(source, out, Path(output))
    if out.exists() and not overwrite:
        raise RecipeError(f"{out}: already exists; pass --overwrite to replace it")
    size = str(max_shard_size).strip().upper().replace(" ", "")  # no unit ends with another: any order matches
    unit = next((u for u in UNITS if size.endswith(u) and size[: -len(u)].replace(".", "", 1).isdigit()), None)
    if unit is None:
        raise RecipeError(f"command line: --max_shard_size {max_shard_size!r} is not a size like 5GB or 500MB")
    shard_bytes = int(float(size[: -len(unit)]) * UNITS[unit])
    config_dir = base_reference(source, base_model)
    config = read_config(config_dir, source)
    if dtype is not None and dtype not in DTYPES:
        raise RecipeError(f"command line: --dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    torch_dtype = DTYPES[dtype] if dtype is not None else config.get("dtype") or config.get("torch_dtype") or "float32"
    zero = ZeroCheckpoint(source)
    lora = (source / "adapter_config.json").is_file()
    progress(f"consolidating {source} (ZeRO-{zero.stage}, {zero.world} ranks, {len(zero.entries)} tensors"
             f"{', LoRA' if lora else ''}) -> {out} [{torch_dtype}]")
    tmp = out.parent / f".{out.name}.partial-{secrets.token_hex(4)}"
    tmp.mkdir()  # not mkdtemp, whose 0700 locks out the team and the serving account: modes follow the umask, as cp's
    try:
        (_merge_lora if lora else _stream_full)(zero, source, config_dir, tmp, torch_dtype, shard_bytes, progress)
        model_card.write(tmp, source, zero.global_steps)
        sync_tree(tmp)  # the files and their entries are on disk before the rename makes them the model
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        checkpoints.sync_dir(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    progress(f"consolidated model: {out}")
    return out


def _stream_full(zero: ZeroCheckpoint, source: Path, config_dir: str, tmp: Path, dtype: str, shard_bytes: int,
                 progress) -> None:
    """Stream the weights while a thread imports transformers, checks names and shapes against the config and
    writes the metadata: that work takes seconds and the streaming is mostly I/O. A failed check stops the
    streaming at the next tensor, and the temporary directory is removed, so nothing appears at OUTPUT."""
    with ThreadPoolExecutor(1) as pool:
        side = pool.submit(lambda: (_check_names(zero, config_dir, source),
                                    _write_metadata(source, config_dir, tmp, dtype, progress)))
        write_model([(e.name, e.shape, lambda e=e: zero.chunks(e)) for e in zero.unique], tmp, dtype, shard_bytes,
                    progress, lambda: side.done() and side.result())  # re-raises the check's error here
        side.result()


def check_apart(source: Path, out: Path, given: Path) -> None:
    """OUTPUT is replaced whole, so it must neither be, hold, nor lie inside the checkpoint read or the checkpoints/
    directory around it (RUN_DIR/final is fine). Compared as real paths: a symlink cannot hide an overlap."""
    source = source.resolve()
    kept = [source, source.parent] if source.name.startswith("checkpoint-") else [source]
    for path in kept:
        if out == path or path in out.parents or out in path.parents:
            raise RecipeError(f"{given}: OUTPUT overlaps {path}, which holds the checkpoint being consolidated; "
                              "replacing OUTPUT would delete it: give a directory outside it, like RUN_DIR/final")


def sync_tree(top: Path) -> None:
    for root, _, names in os.walk(top):
        for name in names:
            with open(Path(root) / name, "rb") as f:
                os.fsync(f.fileno())
        checkpoints.sync_dir(Path(root))


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint dir as given, or the newest complete checkpoint of a run directory; a marked checkpoint's files
    must match its marker."""
    if not path.exists():
        raise RecipeError(f"{path}: does not exist")
    if (path / "latest").is_file():
        if checkpoints.is_complete(path):  # a bare DeepSpeed directory has no marker
            checkpoints.verify(path)
        return path
    for run_dir in (path, path.parent):  # a run directory, or its checkpoints/ directory
        if done := checkpoints.complete(run_dir):
            checkpoints.verify(done[-1])
            return done[-1]
        if partial := ", ".join(c.name for c in checkpoints.listing(run_dir)):
            raise RecipeError(f"{path}: no complete checkpoint ({partial} lack the {checkpoints.MARKER} marker "
                              "that is written once every rank has saved)")
    raise RecipeError(f"{path}: holds no DeepSpeed checkpoint (no 'latest' file, no checkpoints/checkpoint-N)")


def base_reference(source: Path, base_model: str | None) -> str:
    """Where the architecture (and tokenizer) come from: --base_model, the checkpoint, or the run's recipe."""
    if base_model:
        return base_model
    if (source / "config.json").is_file():
        return str(source)
    model = model_card.recipe_of(source).get("model", {})
    if model.get("config"):
        return str(Path(model["config"]).parent)
    if model.get("name_or_path"):
        return model["name_or_path"]
    raise RecipeError(f"{source}: no config.json beside the checkpoint and no run recipe naming the model; pass "
                      "--base_model with the model's directory or hub id")


def read_config(ref: str, source: Path) -> dict:
    local = Path(ref) / "config.json"
    if local.is_file():  # plain JSON: importing transformers costs seconds
        return json.loads(local.read_text())
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(ref).to_dict()
    except (OSError, ValueError) as err:
        raise RecipeError(f"{source}: cannot read the model config from {ref} ({str(err).splitlines()[0]})") from None


def _check_names(zero: ZeroCheckpoint, config_dir: str, source: Path) -> None:
    """Every tensor the model expects is there with its shape, and nothing else. Expected: the known decoder layouts
    (launcher/memory.py: no transformers import, which costs seconds), else the model built on the meta device."""
    config, expected = read_config(config_dir, source), None
    if (config.get("architectures") or ["ForCausalLM"])[0].endswith("ForCausalLM"):
        with contextlib.suppress(memory.UnknownArchitecture):
            expected = memory.named_shapes(config)
    if expected is None:
        import torch
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(config_dir)
        with torch.device("meta"):
            model = auto_class_for(config.to_dict()).from_config(config)
        tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
        expected = {n: tuple(p.shape) for n, p in model.named_parameters() if n not in tied}
    saved = {e.name: e.shape for e in zero.unique}
    wrong = sorted(n for n in saved.keys() & expected.keys() if tuple(saved[n]) != tuple(expected[n]))
    for label, names in (("missing", sorted(expected.keys() - saved.keys())),
                         ("unexpected", sorted(saved.keys() - expected.keys())), ("wrong shape", wrong)):
        if names:
            raise RecipeError(f"{source}: {len(names)} tensors {label} for this model's config.json, e.g. "
                              f"{', '.join(names[:3])}; is --base_model the model that was trained?")


def _merge_lora(zero: ZeroCheckpoint, source: Path, base_ref: str, out: Path, dtype: str, shard_bytes: int,
                progress) -> None:
    """The HF trainer leaves frozen base weights out of LoRA checkpoints: the base comes from base_ref. A peft model
    built on the meta device (no memory) checks the adapter's names and shapes and gives peft's own delta (scaling,
    rsLoRA, fan_in_fan_out); each base tensor is then read from its memory-mapped safetensors file, merged, cast and
    written, so memory holds about one tensor plus the adapter, not the model in fp32 (282 GB for 70B)."""
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from peft.tuners import lora
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoConfig

    trained = {e.name: zero.tensor(e) for e in zero.unique}
    empty = [n for n, t in trained.items() if "lora_" in n and (t.numel() == 0 or not torch.isfinite(t).all())]
    if empty or not any("lora_" in n for n in trained):
        raise RecipeError(f"{source}: the adapter's tensors are missing, empty or not finite {empty[:3]}")
    try:
        config = AutoConfig.from_pretrained(base_ref)
        files = _safetensors_shapes(base_ref)
    except (OSError, ValueError) as err:
        raise RecipeError(f"{source}: cannot load the LoRA base model {base_ref} ({str(err).splitlines()[0]}); "
                          "pass --base_model") from None
    task, head = lora_head(source)
    config.update(head)
    with torch.device("meta"):
        base = auto_class(task).from_config(config)
    tied = set(getattr(base, "all_tied_weights_keys", {}) or {})
    shapes = {n: tuple(t.shape) for n, t in base.state_dict().items() if n not in tied}
    lora_config = LoraConfig.from_pretrained(str(source))
    lora_config.base_model_name_or_path = None  # base_ref is the base now: peft would warn of the renaming
    try:
        with warnings.catch_warnings():  # peft calls a transformers API deprecated in v5: nothing for the user to do
            warnings.simplefilter("ignore", FutureWarning)
            model = get_peft_model(base, lora_config)
    except ValueError as err:  # e.g. a target module the base lacks
        raise RecipeError(f"{source}: the shards do not match this base with this adapter ({err})") from None
    _check_adapter(model.state_dict(), trained, source)
    model.load_state_dict(trained, strict=False, assign=True)  # the meta adapter tensors become the trained ones
    layers = {n.removeprefix("base_model.model.") + ".weight": m for n, m in model.named_modules()
              if isinstance(m, lora.LoraLayer)}
    plain = all(type(m) in (lora.Linear, lora.Embedding) and not m.lora_variant and not any(m.lora_bias.values())
                for m in layers.values())
    # the rest of the trained tensors replace the base's (modules_to_save, a new head; biases with `bias: all`)
    replaced = {n.removeprefix("base_model.model.").replace(".base_layer", "").replace(".modules_to_save.default", "")
                : t for n, t in trained.items() if "lora_" not in n}
    prefix = base.base_model_prefix + "."  # an encoder saved without its head names its tensors without it
    files = {**{prefix + n: f for n, f in files.items() if prefix + n in shapes and n not in shapes}, **files}
    if not plain or shapes.keys() - files.keys() - replaced.keys():  # DoRA & co., or base files named otherwise
        progress("  this adapter or base needs peft's in-memory merge: the base model is loaded whole, in fp32")
        return _merge_lora_in_memory(trained, source, base_ref, out, dtype, shard_bytes, progress)
    if wrong := [n for n, s in shapes.items() if n not in replaced and files[n][1] != s]:
        raise RecipeError(f"{source}: the base model's weights do not match its config.json, e.g. {wrong[:3]}")
    if clash := sorted((layers.keys() | replaced.keys()) & tied):
        raise RecipeError(f"{source}: the adapter changes {clash[0]}, which this model ties to another weight; "
                          "the merged model cannot keep both")

    def merged(name: str) -> list:
        if name in replaced:
            return [replaced[name].reshape(-1)]
        with safe_open(files[name][0], "pt") as f:  # one open per tensor: its pages leave RSS when it closes
            weight = f.get_tensor(name if name in f.keys() else name.removeprefix(prefix))  # noqa: SIM118
        if name in layers:
            weight = weight.float() + layers[name].get_delta_weight("default")
        return [weight.reshape(-1)]

    (out / "adapter").mkdir()
    adapter = model.peft_config["default"]
    adapter.base_model_name_or_path, adapter.inference_mode = base_ref, True  # as peft's save_pretrained writes it
    adapter.save_pretrained(out / "adapter")
    save_file({k: v.contiguous() for k, v in get_peft_model_state_dict(model, state_dict=trained).items()},
              out / "adapter" / "adapter_model.safetensors", metadata={"format": "pt"})
    write_model([(n, s, lambda n=n: merged(n)) for n, s in shapes.items()], out, dtype, shard_bytes,
                progress=lambda _: None)
    merged_config = {**config.to_dict(), "architectures": [type(base).__name__]}
    _write_metadata(source, base_ref, out, dtype, progress, merged_config)


def lora_head(source: Path) -> tuple[str, dict]:
    """The task of the run a LoRA checkpoint belongs to, and what its new head adds to the base model's config (its
    labels; the windows of a reader): peft checkpoints hold the adapter only, the run's stored recipe says the rest.
    Read as plain data, not validated again: its data files may have moved since."""
    from launcher import extractive, sft_fields
    from launcher.modeling import LENGTH_KEY, head_config

    recipe = model_card.recipe_of(source)
    task, head = recipe.get("task", "sft"), recipe.get("head") or {}
    length = (recipe.get("training") or {}).get("max_length") or sft_fields.fields()["max_length"].default
    extra = head_config(task, head.get("labels") or [])
    if task != "sft":  # a language model's evaluate reads whole conversations
        extra[LENGTH_KEY] = length
    if task == "question_answering":
        extra[extractive.CONFIG_KEY] = extractive.window_sizes(length, head.get("stride"))
    return task, extra


def _safetensors_shapes(base_ref: str) -> dict:
    """{tensor name: (file, shape)} of the base model's safetensors files, read from their headers."""
    from safetensors import safe_open

    directory = Path(base_ref)
    if not directory.is_dir():
        from huggingface_hub import snapshot_download

        directory = Path(snapshot_download(base_ref, allow_patterns=["*.json", "*.safetensors"]))
    found = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            found.update({n: (path, tuple(f.get_slice(n).get_shape())) for n in f.keys()})  # noqa: SIM118 (not a dict)
    return found


def _check_adapter(expected: dict, trained: dict, source: Path) -> None:
    missing = sorted(n for n in expected if ("lora_" in n or "modules_to_save" in n) and n not in trained)
    unexpected = sorted(trained.keys() - expected.keys())
    wrong = sorted(n for n in trained.keys() & expected.keys() if trained[n].shape != expected[n].shape)
    if unexpected or missing or wrong:
        raise RecipeError(f"{source}: the shards do not match this base with this adapter (unexpected "
                          f"{unexpected[:3]}, missing {missing[:3]}, wrong shape {wrong[:3]})")


def _merge_lora_in_memory(trained: dict, source: Path, base_ref: str, out: Path, dtype: str, shard_bytes: int,
                          progress) -> None:
    """peft's merge_and_unload, for what the streamed merge does not implement: the base is held in fp32."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig

    try:
        task, head = lora_head(source)
        config = AutoConfig.from_pretrained(base_ref)
        config.update(head)  # as plain config keys: from_pretrained would hand unknown ones to the model's __init__
        base = auto_class(task).from_pretrained(base_ref, config=config, dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise RecipeError(f"{source}: cannot load the LoRA base model {base_ref} ({str(err).splitlines()[0]}); "
                          "pass --base_model") from None
    model = get_peft_model(base, LoraConfig.from_pretrained(str(source)))
    model.load_state_dict(trained, strict=False)
    model.save_pretrained(out / "adapter", safe_serialization=True)
    merged = model.merge_and_unload()
    tied = set(getattr(merged, "all_tied_weights_keys", {}) or {})
    write_model([(n, tuple(p.shape), lambda p=p: [p.detach().reshape(-1)]) for n, p in merged.state_dict().items()
                 if n not in tied], out, dtype, shard_bytes, progress=lambda _: None)
    _write_metadata(source, base_ref, out, dtype, progress)


def _write_metadata(source: Path, config_dir: str, out: Path, dtype: str, progress, config: dict | None = None) -> None:
    """config.json with the dtype written, the tokenizer, and a generation config whose EOS is the chat's end of turn.
    A checkpoint the launcher's worker wrote has a tokenizer and a generation config that already stops there: they
    are copied, so consolidating a full fine-tune never imports transformers (seconds). Others are rebuilt."""
    config = config or read_config(config_dir, source)
    config["dtype"] = dtype
    config.pop("torch_dtype", None)  # the older name of the same key
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    files = [f for f in TOKENIZER_FILES if (source / f).is_file()]
    reuse = "tokenizer_config.json" in files and checkpoints.is_complete(source)
    for name in files if reuse else ():
        shutil.copyfile(source / name, out / name)
    tokenizer = None
    for ref in () if reuse else (source, config_dir):  # the checkpoint's tokenizer, else the base model's
        if not Path(ref).is_dir() or (Path(ref) / "tokenizer_config.json").is_file():
            from transformers import AutoTokenizer

            with contextlib.suppress(OSError, ValueError):
                tokenizer = AutoTokenizer.from_pretrained(ref)
                break
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    elif not reuse:
        progress("  no tokenizer beside the checkpoint or in the base model: the model is written without one")
    if is_classifier(config):
        return  # a classifier generates nothing: no generation config
    from_config = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
                   if config.get(k) is not None}  # what a generation config takes from the model's config
    if tokenizer is None:
        shipped = Path(source if reuse else config_dir) / "generation_config.json"
        if shipped.is_file():
            shutil.copyfile(shipped, out / shipped.name)
        else:
            (out / shipped.name).write_text(json.dumps(from_config, indent=2) + "\n")
        return
    from transformers import GenerationConfig

    try:
        generation = GenerationConfig.from_pretrained(config_dir)
    except OSError:
        generation = GenerationConfig.from_dict(from_config)
    stop_at_end_of_turn(generation, tokenizer)
    generation.save_pretrained(out)
