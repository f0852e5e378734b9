"""Benchmark: training speed of `launcher launch` on 2 CPU ranks, side by side (issue 15).

a. `launcher launch recipes/smoke.yaml --nproc_per_node 2` against bench/plain_trl_sft.py (the same training written
   by hand with TRL's SFTTrainer + DeepSpeed ZeRO-3, started by the real `deepspeed` launcher, cores/2 threads a
   rank), alternating, PAIRS pairs: each train_runtime and the median of script / launcher (target >= 1.0: the
   launcher trains at least as fast as the tuned script).
b. the launcher padded (TRL's default) against packed (`--training.packing=true`: TRL's "bfd" bins, padding-free)
   on the UltraChat-shaped sample, bench/train_speed_packing.yaml, with a tiny Llama built here: non-padding
   tokens (TRL's num_tokens) per second of train_runtime (target: packed >= 1.5x padded).

Every run gets a fresh output directory and its own free port; each run's log is kept in bench/out/train_speed/logs.
A failed run stops the bench with the tail of its log; its process group is killed (as on Ctrl-C or a timeout), so
no rank outlives the bench. The table goes to stdout and bench/out/train_speed.md.

Usage: python bench/train_speed.py [--pairs 3] [--packing_rounds 2] [--only a|b]     (from anywhere; ~10 minutes)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out"
WORK = OUT / "train_speed"
RUN_TIMEOUT = 420  # seconds for one run, start-up and consolidation included; ~1 minute each on 2 quiet cores
PYTHON = Path(sys.executable)
LAUNCHER = [str(PYTHON), "-m", "launcher"]
DEEPSPEED = str(PYTHON.parent / "deepspeed") if (PYTHON.parent / "deepspeed").exists() else "deepspeed"
PACKING_RECIPE = "bench/train_speed_packing.yaml"
STAND_IN = REPO / "launcher" / "shipped" / "stand-ins" / "llama-3.1-tokenizer"
SAMPLE = REPO / "launcher" / "shipped" / "stand-ins" / "ultrachat_sample.jsonl"
FIRST_SPECIAL = 128000  # Llama 3.1's special tokens are ids 128000-128255 (the stand-in keeps them there)


class BenchError(Exception):
    pass


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(name: str, command: list[str], env: dict[str, str]) -> float:
    """Run a command in its own process group, its output to logs/NAME.log; the group is killed if the command fails,
    times out or the bench is interrupted. Returns the wall time."""
    log_path = WORK / "logs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log_path, "w") as log:
        log.write(" ".join(command) + "\n")
        log.flush()
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            raise BenchError(f"{name}: no end after {RUN_TIMEOUT} s; stopped. Log: {log_path}\n"
                             f"{tail(log_path)}") from None
        except BaseException:  # Ctrl-C or SIGTERM: the ranks go too
            kill_group(proc)
            raise
        finally:
            kill_group(proc, quiet=True)  # anything the command left running in its group
    if code != 0:
        raise BenchError(f"{name} failed (exit {code}). Log: {log_path}\n{tail(log_path)}")
    return time.perf_counter() - started


def kill_group(proc: subprocess.Popen, quiet: bool = False) -> None:
    """SIGTERM to the command's process group (the launcher stops its ranks on it), SIGKILL to what is left after
    the grace period. The leader is reaped here, so a zombie of it does not count as alive."""
    for sig, grace in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        if not quiet:
            say(f"sent {sig.name} to process group {proc.pid}")
        deadline = time.time() + grace
        while time.time() < deadline:
            try:
                proc.wait(timeout=0.2)
                os.killpg(proc.pid, 0)  # the leader is gone; any other member left?
            except subprocess.TimeoutExpired:
                continue
            except ProcessLookupError:
                return
            time.sleep(0.2)


def tail(path: Path, lines: int = 25) -> str:
    text = path.read_text(errors="replace").replace("\r", "\n")  # progress bars redraw with carriage returns
    return "\n".join([line for line in text.splitlines() if line.strip()][-lines:])


def final_metrics(trainer_state: Path) -> dict:
    """The trainer's last train metrics and its last logged num_tokens (TRL's count of non-padding tokens)."""
    if not trainer_state.is_file():
        raise BenchError(f"{trainer_state} is missing: the run did not save its state")
    history = json.loads(trainer_state.read_text())["log_history"]
    final = next((e for e in reversed(history) if "train_runtime" in e), None)
    if final is None:
        raise BenchError(f"{trainer_state}: no train_runtime in the log history")
    tokens = next((e["num_tokens"] for e in reversed(history) if "num_tokens" in e), None)
    return {**final, "num_tokens": tokens}


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    return path


def base_env() -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
           "PYTHONUNBUFFERED": "1"}
    env.pop("OMP_NUM_THREADS", None)  # the launcher gives each rank its share of the cores; the script gets the same
    env.pop("LAUNCHER_STOP_FILE", None)
    return env


# --- a. the launcher against the hand-written script --------------------------------------------------------------

def check_script_matches_recipe() -> None:
    """The script's hyperparameters are the smoke recipe's, as `launcher plan` resolves it for 2 ranks."""
    result = subprocess.run([*LAUNCHER, "plan", "recipes/smoke.yaml", "--nproc_per_node", "2", "--format", "json"],
                            cwd=REPO, capture_output=True, text=True, env=base_env(), timeout=120)
    if result.returncode != 0:
        raise BenchError(f"launcher plan recipes/smoke.yaml failed:\n{result.stderr[-3000:]}")
    plan = json.loads(result.stdout)
    spec = importlib.util.spec_from_file_location("plain_trl_sft", REPO / "bench" / "plain_trl_sft.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)  # top level: constants only
    training, recipe = plan["recipe"]["training"], plan["recipe"]
    differ = {k: (training.get(k), script.TRAINING.get(k)) for k in {*training, *script.TRAINING}
              if training.get(k) != script.TRAINING.get(k)}
    model, data = Path(recipe["model"]["name_or_path"]), [Path(s["path"]) for s in recipe["data"]["train"]]
    held_out = [Path(s["path"]) for s in recipe["data"]["eval"]]
    if model != REPO / script.MODEL or data != [REPO / script.DATA] or held_out != [REPO / script.EVAL]:
        differ["model/data"] = (f"{model} {data} {held_out}", f"{script.MODEL} {script.DATA} {script.EVAL}")
    if differ:
        raise BenchError("bench/plain_trl_sft.py no longer trains what recipes/smoke.yaml does (recipe, script): "
                         + ", ".join(f"{k} {a!r} vs {b!r}" for k, (a, b) in sorted(differ.items())))


def launcher_smoke(i: int) -> dict:
    out = fresh(WORK / "runs" / f"launcher-{i}")
    wall = run(f"a{i}-launcher", [*LAUNCHER, "launch", "recipes/smoke.yaml", "--nproc_per_node", "2",
                                  "--master_port", str(free_port()), f"--run.output_dir={out}",
                                  "--run.eval_answers=0"], base_env())  # the script generates no answers
    return {"wall": wall, **final_metrics(out / "checkpoints" / "trainer_state.json")}


def plain_script(i: int) -> dict:
    out = fresh(WORK / "runs" / f"script-{i}")
    env = {**base_env(), "OMP_NUM_THREADS": str(max(1, cores() // 2))}
    wall = run(f"a{i}-script", [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()),
                                "bench/plain_trl_sft.py", str(out)], env)
    return {"wall": wall, **final_metrics(out / "trainer_state.json")}


def part_a(pairs: int) -> list[str]:
    say(f"a. launcher vs plain TRL script, recipes/smoke.yaml, 2 ranks, {pairs} pairs (load {load()})")
    check_script_matches_recipe()
    rows, ratios = [], []
    for i in range(1, pairs + 1):
        order = [("launcher", launcher_smoke), ("script", plain_script)]
        if i % 2 == 0:
            order.reverse()  # alternate which goes first: a slow spell of the machine hits both
        got = {}
        for label, fn in order:
            say(f"a. pair {i}/{pairs}: {label} ...")
            got[label] = fn(i)
            say(f"a. pair {i}/{pairs}: {label} train_runtime {got[label]['train_runtime']:.1f} s "
                f"(wall {got[label]['wall']:.0f} s, train_loss {got[label]['train_loss']:.4f}, load {load()})")
        ratio = got["script"]["train_runtime"] / got["launcher"]["train_runtime"]
        ratios.append(ratio)
        rows.append(f"| {i} | {got['launcher']['train_runtime']:.1f} | {got['script']['train_runtime']:.1f} | "
                    f"{ratio:.2f}x | {got['launcher']['train_loss']:.4f} / {got['script']['train_loss']:.4f} |")
    median = statistics.median(ratios)
    verdict = "met" if median >= 1.0 else "NOT met"
    return ["## a. `launcher launch recipes/smoke.yaml --nproc_per_node 2` vs bench/plain_trl_sft.py", "",
            "ZeRO-3, 2 CPU ranks, 300 steps, global batch 32; the script under `deepspeed --num_gpus 2` with "
            f"OMP_NUM_THREADS={max(1, cores() // 2)} (cores / ranks), DeepSpeed's defaults for what it does not set.",
            "", "| pair | launcher train_runtime (s) | script train_runtime (s) | script / launcher | train_loss "
            "launcher / script |", "|---|---|---|---|---|", *rows, "",
            f"median script / launcher: **{median:.2f}x** (target >= 1.0x: {verdict})", ""]


# --- b. packed against padded -------------------------------------------------------------------------------------

def compact_id(i: int, first_free: int) -> int:
    return i - FIRST_SPECIAL + first_free if i >= FIRST_SPECIAL else i


def build_packing_model(directory: Path) -> dict:
    """A tiny Llama (Llama 3.1 8B's config.json, shrunk; seeded random weights) and the stand-in Llama 3.1 tokenizer
    with its chat template, its 256 special tokens renumbered from 128000-128255 to right after its 786 BPE tokens.
    Tokenization is unchanged (checked on every chat of the sample, id for id); what changes is the vocabulary the
    model needs: 1042 instead of 128256. With the full vocabulary a 16M-parameter toy spends nearly all its time and
    memory on logits (4 x 512 x 128256 floats a micro batch, 1 GB), which measures the CPU's page faults, not
    packing."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    fresh(directory).mkdir(parents=True)
    spec = json.loads((STAND_IN / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    first_free = sum(1 for i in vocab.values() if i < FIRST_SPECIAL)
    if sorted(vocab.values()) != [*range(first_free), *range(FIRST_SPECIAL, FIRST_SPECIAL + len(vocab) - first_free)]:
        raise BenchError(f"{STAND_IN}: ids are not 0..N-1 then {FIRST_SPECIAL}..: the renumbering assumes so")
    spec["model"]["vocab"] = {token: compact_id(i, first_free) for token, i in vocab.items()}
    for added in spec["added_tokens"]:
        added["id"] = compact_id(added["id"], first_free)
    (directory / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(STAND_IN / name, directory / name)
    original, compact = AutoTokenizer.from_pretrained(str(STAND_IN)), AutoTokenizer.from_pretrained(str(directory))
    chats = [json.loads(line)["messages"] for line in SAMPLE.read_text().splitlines() if line.strip()]
    lengths = []
    for chat in chats:
        a = original.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]
        b = compact.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]
        if [compact_id(i, first_free) for i in a] != b:
            raise BenchError("the renumbered stand-in tokenizer encodes a sample chat differently")
        lengths.append(len(b))

    config = json.loads((REPO / "recipes" / "llama-3.1-8b" / "config.json").read_text())
    eos = config["eos_token_id"]
    shape = {k: v for k, v in config.items() if k not in ("model_type", "torch_dtype", "architectures")}
    shape.update(MODEL_SHAPE, vocab_size=len(vocab), bos_token_id=compact_id(config["bos_token_id"], first_free),
                 eos_token_id=[compact_id(i, first_free) for i in eos] if isinstance(eos, list)
                 else compact_id(eos, first_free), dtype="float32")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **shape), dtype=torch.float32)
    model.save_pretrained(directory)
    GenerationConfig.from_model_config(model.config).save_pretrained(directory)
    return {"params": sum(p.numel() for p in model.parameters()), "lengths": lengths}


# The toy's shape (see bench/train_speed_packing.yaml for why): Llama 3.1's proportions (GQA 4:1, MLP 3.5x), narrow.
MODEL_SHAPE = {"hidden_size": 512, "intermediate_size": 1792, "num_hidden_layers": 2, "num_attention_heads": 8,
               "num_key_value_heads": 2, "head_dim": 64}


# part b's runs: (label, packing, extra options). The recipe's micro batch is 4 chats padded; packed, a micro batch is
# 4 bins of up to 512 tokens (~2 chats each: twice the tokens a step, half the steps), or 2 bins (as many chats a step
# as padded, so the same optimisation, and a flattened batch half as long for the dense attention, see the YAML), or
# 1 bin (a row of at most 512 tokens: the least dense-attention waste on CPU, twice the optimizer steps).
PACKING_RUNS = [("padded", False, []), ("packed", True, []),
                ("packed, micro 2", True, ["--training.per_device_train_batch_size=2"]),
                ("packed, micro 1", True, ["--training.per_device_train_batch_size=1"])]


def launcher_packing(name: str, packed: bool, options: list[str]) -> dict:
    out = fresh(WORK / "runs" / name)
    wall = run(name, [*LAUNCHER, "launch", PACKING_RECIPE, "--nproc_per_node", "2", "--master_port", str(free_port()),
                      f"--run.output_dir={out}", f"--training.packing={str(packed).lower()}", *options], base_env())
    got = {"wall": wall, **final_metrics(out / "checkpoints" / "trainer_state.json")}
    if not got["num_tokens"]:
        raise BenchError(f"{name}: TRL logged no num_tokens")
    got["tokens_per_s"] = got["num_tokens"] / got["train_runtime"]
    return got


def part_b(pairs: int, extra: list[str]) -> list[str]:
    say(f"b. padded vs packed, {PACKING_RECIPE}, 2 ranks, {pairs} rounds (load {load()})")
    built = build_packing_model(WORK / "tiny-llama")
    lengths = built["lengths"]
    say(f"b. tiny Llama: {built['params'] / 1e6:.1f} M params; sample: {len(lengths)} chats, {min(lengths)}-"
        f"{max(lengths)} tokens (mean {statistics.mean(lengths):.0f}, {sum(lengths)} in all)")
    results: dict[str, list[dict]] = {label: [] for label, _, _ in PACKING_RUNS}
    for i in range(1, pairs + 1):
        shift = (i - 1) % len(PACKING_RUNS)  # rotate the order: a slow spell of the machine hits each kind
        for label, packed, options in PACKING_RUNS[shift:] + PACKING_RUNS[:shift]:
            say(f"b. round {i}/{pairs}: {label} ...")
            g = launcher_packing(f"b{i}-{label.replace(', ', '-').replace(' ', '')}", packed, [*options, *extra])
            results[label].append(g)
            say(f"b. round {i}/{pairs}: {label}: {g['num_tokens']:.0f} tokens in {g['train_runtime']:.1f} s = "
                f"{g['tokens_per_s']:.0f} tokens/s, {g['step']} steps (wall {g['wall']:.0f} s, load {load()})")
    padded = statistics.median(g["tokens_per_s"] for g in results["padded"])
    rows, verdicts = [], []
    for label, _, options in PACKING_RUNS:
        runs = results[label]
        speed = statistics.median(g["tokens_per_s"] for g in runs)
        each = ", ".join(f"{g['tokens_per_s']:.0f}" for g in runs)
        ratio = speed / padded
        rows.append(f"| {label} | {' '.join(options) or '-'} | {each} | {speed:.0f} | "
                    f"{runs[0]['num_tokens']:.0f} / {runs[0]['step']} | {ratio:.2f}x |")
        if label != "padded":
            verdicts.append(f"{label} {ratio:.2f}x")
    shape = ", ".join(f"{k} {v}" for k, v in MODEL_SHAPE.items())
    met = "met" if any(float(v.split()[-1][:-1]) >= 1.5 for v in verdicts) else "NOT met"
    return ["## b. padded vs packed (`--training.packing=true`: bfd, padding-free), " + f"`{PACKING_RECIPE}`", "",
            f"Tiny Llama ({built['params'] / 1e6:.1f} M params: {shape}, vocabulary 1042), sdpa attention, ZeRO-3, "
            f"2 CPU ranks, micro batch 4 unless given; {len(lengths)} UltraChat-shaped chats of {min(lengths)}-"
            f"{max(lengths)} tokens (mean {statistics.mean(lengths):.0f}). Speed: non-padding tokens (TRL's "
            "num_tokens, which counts the bins accelerate repeats to even out the ranks' last batch) / train_runtime."
            + (f" Extra options: `{' '.join(extra)}`." if extra else ""), "",
            "| run | options | tokens/s, each round | median | tokens / steps | vs padded |",
            "|---|---|---|---|---|---|", *rows, "",
            f"packed / padded (medians): {', '.join(verdicts)} (target >= 1.5x: {met})", ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=3, help="launcher/script pairs (part a)")
    parser.add_argument("--packing_rounds", type=int, default=2,
                        help="rounds of padded and the packed runs (part b)")
    parser.add_argument("--only", choices=("a", "b"), help="run one part")
    parser.add_argument("--packing_option", action="append", default=[],
                        help="an extra launcher option for both runs of part b (e.g. --training.num_train_epochs=1)")
    args = parser.parse_args()
    # kill/timeout send SIGTERM: exit through run()'s clean-up, which stops the ranks, as Ctrl-C does
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    started, load_before = time.perf_counter(), load()
    fresh(WORK / "runs")
    fresh(WORK / "logs")
    say(f"{cores()} cores, load average (1/5/15 min) {load_before}; work directory {WORK}")
    sections = []
    try:
        if args.only in (None, "a"):
            sections += part_a(args.pairs)
        if args.only in (None, "b"):
            sections += part_b(args.packing_rounds, args.packing_option)
    except BenchError as err:
        sys.exit(f"bench failed: {err}")
    minutes = (time.perf_counter() - started) / 60
    head = [f"# Training speed, {time.strftime('%Y-%m-%d %H:%M')}", "",
            f"{cores()} CPU cores; load average (1/5/15 min) {load_before} at the start, {load()} at the end; "
            f"{minutes:.1f} minutes in all. `python bench/train_speed.py` "
            + " ".join(sys.argv[1:]), ""]
    text = "\n".join(head + sections)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "train_speed.md").write_text(text)
    print("\n" + text, flush=True)
    shutil.rmtree(WORK / "runs", ignore_errors=True)  # checkpoints: tens of MB a run; the logs stay


if __name__ == "__main__":
    main()
