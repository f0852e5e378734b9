#!/usr/bin/env bash
# One prepared check of the launcher on a single-GPU machine (issues 14 and 15), for the device tool's nvidia-h200
# (one H200, 16 cores, no network, no trl/deepspeed/datasets/fire there: they travel as wheels in .whl/).
#
#   here, once:   bash bench/gpu_wheels.sh                      # fills .whl/ (~21 MiB), ignored by git
#   on the GPU:   bash bench/gpu_check.sh                       # device run: carry [".whl"], timeout_s 560
#   rehearsal:    GPU_CHECK_REHEARSAL=1 bash bench/gpu_check.sh # same steps on this CPU, tiny sizes, local .venv
#
# Every step is timed, has its own timeout inside a global budget (GPU_CHECK_BUDGET_S, default 470 s on the GPU), is
# recorded pass / fail / skipped with one line of detail, and a failing step does not stop the others. Written under
# $OUT (default ./gpu-check-out): results.md (the table, machine, numbers), results.jsonl (one object per step, with
# its metrics), steps.log (every step's log, the last 300 lines each, appended as the steps end), logs.tar.gz (the
# whole logs, plans, trainer states, metrics) and gpu.csv (nvidia-smi samples: memory, utilisation). At most 8 files
# come back from the device, none deeper than 2 folders: hence the archive.
#
# Steps (GPU_CHECK_STEPS="name name ..." runs only those, the rest recorded as skipped):
#   install              the carried wheels into /tmp/site (GPU only)
#   env                  versions, imports, unmet requirements, GPU name / capability / SMs
#   peak_flops           issue 14.10: tracking.peak_flops for the name torch reports; a bf16 matmul for scale
#   refuse_flash_launch  issue 14.1: flash_attention_2 without flash-attn: one line, exit 2, no rank, no run dir
#   refuse_flash_submit  ... the same through `submit --preflight`
#   refuse_qlora_launch  issue 14.2: lora.quantize without bitsandbytes, the same way
#   refuse_qlora_submit
#   precision_plan       issue 14.3: no bf16/fp16 in the recipe -> bf16 in the resolved DeepSpeed config on cc 9.0
#   weights_offline      issue 14.4: a hub id not cached, HF_HUB_OFFLINE=1: launch's cache line is one refusal
#   smoke_zero2          issue 15: recipes/smoke.yaml, bf16, ZeRO-2, 1 GPU
#   smoke_zero3          issue 15: the same under ZeRO-3
#   long_chats           the 1B runs' rows: stand-in UltraChat chats joined into ~2k-token conversations
#   llama1b_packed       issue 15 / 14.10: random Llama of 1.24 B params at 2k context, packed: tokens/s, MFU
#   consolidate          `launcher consolidate` of its checkpoint (bf16), timed
#   reload               the merged model loaded with transformers, on the GPU, one forward pass
#   evaluate             issue 14.9: `launcher evaluate` of it: on the GPU, in the model's dtype; time, metrics
#   llama1b_padded       the same 1B run padded (training.packing false): tokens/s, MFU
#
# Rehearsal (GPU_CHECK_REHEARSAL=1): the local .venv, no wheels, hidden 64 instead of the 1B, a few steps, bf16 off,
# 1 thread; GPU-only expectations (bf16 on compute capability 9.0, device placement, MFU, the device's name) are
# recorded as "skipped: no GPU". W&B: the launcher's tracking callback (tokens/s, MFU) logs through a stand-in
# `wandb` module written under the work directory (the device has no wandb), which keeps what it is given.
# shellcheck disable=SC2329  # the steps s_NAME are called by name, from `step`
{  # the whole script is one block, read before it runs: editing this file meanwhile cannot change a run under way
set -u -o pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
REHEARSAL=${GPU_CHECK_REHEARSAL:-0}
OUT=${OUT:-$ROOT/gpu-check-out}
if [[ $REHEARSAL == 1 ]]; then
  WORK=${GPU_CHECK_WORK:-/tmp/gpu-check-rehearsal}
  BUDGET=${GPU_CHECK_BUDGET_S:-600}
  PY=${PY:-$ROOT/.venv/bin/python}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
  # a 1B run writes ~17 GB of ZeRO-2 checkpoint (bf16 weights, fp32 master and Adam states): on a disk, not a /tmp
  # in memory, and with room (the packed run's is removed once consolidated, before the padded run writes its own)
  WORK=${GPU_CHECK_WORK:-/tmp/gpu-check}
  if [[ -z ${GPU_CHECK_WORK:-} ]] && { [[ $(stat -f -c %T /tmp 2>/dev/null) == tmpfs ]] ||
       (($(df --output=avail -B1G /tmp 2>/dev/null | tail -n 1) < 30)); }; then
    WORK=$ROOT/.gpu-check-work
  fi
  BUDGET=${GPU_CHECK_BUDGET_S:-470}
  PY=${PY:-python3}
  # 16 cores, one rank: torch's CPU side (random init of 1.2 B weights, data collation) gets half, tokenizing the rest
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
fi
SITE=${GPU_CHECK_SITE:-/tmp/site}
SELECTED=${GPU_CHECK_STEPS:-}
T0=$EPOCHSECONDS
rm -rf "$WORK" && mkdir -p "$WORK"/{logs,metrics,runs,shim/wandb,hf} "$OUT" || exit 1
rm -f "$OUT"/results.md "$OUT"/results.jsonl "$OUT"/steps.log "$OUT"/logs.tar.gz "$OUT"/gpu.csv
LOGS=$WORK/logs
CHECK=$WORK/check.py
SAMPLES=$WORK/gpu.csv

export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HOME=$WORK/hf HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
  TRANSFORMERS_NO_ADVISORY_WARNINGS=1 WANDB_MODE=offline HF_HUB_DISABLE_TELEMETRY=1
if [[ $REHEARSAL == 1 ]]; then  # the stand-in wandb first, then this checkout (the venv has the rest)
  export PYTHONPATH="$WORK/shim:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
else  # the stand-in wandb, the carried wheels (ahead of the image's own versions), this checkout
  export PYTHONPATH="$WORK/shim:$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
export PATH="$SITE/bin:$PATH"
export GPU_CHECK_REHEARSAL=$REHEARSAL GPU_CHECK_WORK=$WORK GPU_CHECK_OUT=$OUT
LAUNCHER=("$PY" -m launcher)

# ---------------------------------------------------------------------------------------------------------------
# the stand-in wandb: what launcher/tracking.py gives a W&B run, as JSON lines in <run dir>/wandb-shim.jsonl
cat >"$WORK/shim/wandb/__init__.py" <<'EOF'
"""Stand-in for wandb (bench/gpu_check.sh): keeps what launcher.tracking logs, as JSON lines in <dir>/wandb-shim.jsonl.
`run` stays None, so libraries that look for an active W&B run (TRL, transformers) find none."""
import json
import os
import time

run = None


class _Run:
    def __init__(self, directory, id, name, settings):
        self.id, self.name, self.url, self.summary = id, name, None, {}
        self._file = open(os.path.join(directory or ".", "wandb-shim.jsonl"), "a")
        self._write({"init": settings, "id": id, "name": name})

    def _write(self, record):
        self._file.write(json.dumps(record, default=str) + "\n")
        self._file.flush()

    def define_metric(self, *args, **kwargs):
        pass

    def log(self, data, *args, **kwargs):
        self._write({"time": time.time(), "log": data})

    def log_artifact(self, *args, **kwargs):
        pass

    def finish(self, *args, **kwargs):
        self._write({"time": time.time(), "summary": self.summary})
        self._file.close()


def init(project=None, entity=None, name=None, group=None, tags=None, notes=None, mode=None, dir=None, id=None,
         resume=None, config=None, **kwargs):
    return _Run(dir, id or "shim", name, {"project": project, "mode": mode, "resume": resume,
                                          "world_size": (config or {}).get("world_size")})
EOF

# ---------------------------------------------------------------------------------------------------------------
# the checks: each prints one line "STATUS<TAB>DETAIL" (pass, fail, skipped) and may write metrics/<step>.json
cat >"$CHECK" <<'EOF'
import json, math, os, re, statistics, subprocess, sys, time
from pathlib import Path

WORK, OUT = Path(os.environ["GPU_CHECK_WORK"]), Path(os.environ["GPU_CHECK_OUT"])
REHEARSAL = os.environ.get("GPU_CHECK_REHEARSAL") == "1"
NO_GPU = "skipped: no GPU"


def verdict(status, detail, metrics=None, step=None):
    if metrics is not None and step:
        (WORK / "metrics" / f"{step}.json").write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    print(f"{status}\t{' '.join(str(detail).split())}")
    sys.exit(0)


def lines(path):
    text = Path(path).read_text(errors="replace") if Path(path).is_file() else ""
    return [l for l in re.split(r"[\r\n]+", text) if l.strip()]


def env():
    return json.loads((WORK / "env.json").read_text()) if (WORK / "env.json").is_file() else {}


def gpu_baseline():
    return env().get("gpu_memory_used_mib_idle") or 0


def gpu_peak(t0, t1):
    """Peak GPU memory (MiB) and utilisation (%) sampled between t0 and t1 (epoch seconds)."""
    samples = []
    for row in lines(WORK / "gpu.csv"):
        try:
            t, mem, util = (float(x) for x in row.split(",")[:3])
        except ValueError:
            continue
        if t0 <= t <= t1:
            samples.append((mem, util))
    if not samples:
        return None, None
    return max(m for m, _ in samples), max(u for _, u in samples)


# --- bookkeeping --------------------------------------------------------------------------------------------------
def record(step, status, seconds, rc, detail, t0, t1, what):
    metrics_file = WORK / "metrics" / f"{step}.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    mem, util = gpu_peak(float(t0), float(t1))
    if mem is not None:
        metrics.update(gpu_memory_peak_mib=mem, gpu_util_peak=util)
    row = {"step": step, "status": status, "seconds": round(float(seconds), 1), "rc": None if rc == "" else int(rc),
           "what": what, "detail": detail, "metrics": metrics}
    with open(OUT / "results.jsonl", "a") as f:
        f.write(json.dumps(row, default=str) + "\n")


def render():
    rows = [json.loads(l) for l in lines(OUT / "results.jsonl")]
    e = env()
    counts = {s: sum(r["status"] == s for r in rows) for s in ("pass", "fail", "skipped")}
    mode = "REHEARSAL on CPU (tiny sizes)" if REHEARSAL else "GPU run"
    out = [f"# bench/gpu_check.sh: {mode}", "",
           f"{time.strftime('%Y-%m-%d %H:%M:%S')}; {counts['pass']} pass, {counts['fail']} fail, "
           f"{counts['skipped']} skipped; {sum(r['seconds'] for r in rows):.0f} s in steps", ""]
    if e:
        gpu = (f"{e['gpu_name']} (capability {e.get('capability')}, {e.get('sms')} SMs, {e.get('gpu_memory_gib')} "
               f"GiB), driver {e.get('driver')}" if e.get("gpu_name") else "no GPU")
        out += [f"- machine: {gpu}, {e.get('cpus')} CPUs, Python {e.get('python')}",
                "- versions: " + ", ".join(f"{k} {v}" for k, v in e.get("versions", {}).items() if v), ""]
    out += ["| step | status | s | detail |", "|---|---|---:|---|"]
    out += [f"| {r['step']} | {r['status'].upper()} | {r['seconds']:.1f} | {r['detail'].replace('|', '/')} |"
            for r in rows]
    numbers = []
    for r in rows:
        m = r["metrics"]
        if m.get("tokens_per_second"):
            numbers.append(f"- {r['step']}: {m['tokens_per_second']:,.0f} tokens/s (callback, median after the "
                           f"first log), MFU {fmt_pct(m.get('mfu'))} (callback) / {fmt_pct(m.get('mfu_recomputed'))} "
                           f"(recomputed), {m.get('tokens_per_step')} tokens per step, padding "
                           f"{fmt_pct(m.get('padding_share'))}; {m.get('speed_line') or 'no speed: line'}; "
                           f"train_runtime {m.get('train_runtime')} s; GPU peak {m.get('gpu_memory_peak_mib')} MiB")
        elif r["step"] in ("consolidate", "reload", "evaluate") and r["status"] == "pass":
            numbers.append(f"- {r['step']}: {r['seconds']:.1f} s; {r['detail']}")
    if numbers:
        out += ["", "## Numbers", "", *numbers]
    (OUT / "results.md").write_text("\n".join(out) + "\n")
    width = max([len(r["step"]) for r in rows] + [4])
    print(f"\n{'step':<{width}}  status   seconds  detail")
    for r in rows:
        print(f"{r['step']:<{width}}  {r['status'].upper():<7}  {r['seconds']:7.1f}  {r['detail'][:160]}")
    print(f"{counts['pass']} passed, {counts['fail']} failed, {counts['skipped']} skipped")


def fmt_pct(x):
    return "n/a" if x is None else f"{100 * x:.1f}%"


# --- env ------------------------------------------------------------------------------------------------------------
DISTS = ["torch", "transformers", "trl", "deepspeed", "datasets", "peft", "accelerate", "huggingface_hub",
         "tokenizers", "safetensors", "fire", "pydantic", "pydantic_core", "pyarrow", "pandas", "numpy", "fsspec",
         "dill", "multiprocess", "xxhash", "regex", "typing_extensions", "hjson", "psutil", "py-cpuinfo", "msgpack",
         "ninja", "einops", "PyYAML", "packaging", "Jinja2", "termcolor", "typer", "triton", "flash-attn",
         "bitsandbytes", "kernels", "wandb"]
IMPORTS = ["torch", "transformers", "trl", "deepspeed", "datasets", "peft", "accelerate", "fire", "pydantic",
           "launcher.cli", "launcher.train", "launcher.consolidate", "launcher.evaluate"]


def check_env():
    import importlib, importlib.metadata as md, platform
    from packaging.requirements import Requirement
    from packaging.version import Version
    versions = {}
    for d in DISTS:
        try:
            versions[d] = md.version(d)
        except md.PackageNotFoundError:
            versions[d] = None
    failed = {}
    for module in IMPORTS:
        try:
            importlib.import_module(module)
        except Exception as err:  # noqa: BLE001
            failed[module] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:200]
    unmet = []
    for dist in ["transformers", "trl", "deepspeed", "datasets", "peft", "accelerate", "fire", "pydantic",
                 "multiprocess", "huggingface_hub", "tokenizers"]:
        try:
            reqs = md.requires(dist) or []
        except md.PackageNotFoundError:
            continue
        for text in reqs:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            try:
                have = md.version(req.name)
            except md.PackageNotFoundError:
                have = None
            if have is None or not req.specifier.contains(Version(have), prereleases=True):
                unmet.append(f"{dist} needs {req.name}{req.specifier} (found {have})")
    try:  # the launcher's own floors (pyproject.toml): the versions the suite passed on
        import tomllib
        for text in tomllib.loads(Path("pyproject.toml").read_text())["project"]["dependencies"]:
            req = Requirement(text)
            have = versions.get(req.name)
            if have is None:
                try:
                    have = md.version(req.name)
                except md.PackageNotFoundError:
                    pass
            if have is None or not req.specifier.contains(Version(have), prereleases=True):
                unmet.append(f"launcher floor {req.name}{req.specifier} (found {have})")
    except Exception as err:  # noqa: BLE001
        unmet.append(f"pyproject.toml not read: {err}")
    info = {"versions": versions, "import_failures": failed, "unmet": unmet, "python": platform.python_version(),
            "cpus": os.cpu_count(), "rehearsal": REHEARSAL}
    try:
        import torch
        info.update(torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info.update(gpu_name=torch.cuda.get_device_name(0), capability=f"{props.major}.{props.minor}",
                        sms=props.multi_processor_count, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                        gpu_count=torch.cuda.device_count())
    except Exception as err:  # noqa: BLE001
        info["torch_error"] = str(err)[:200]
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap,driver_version,memory.used",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=30).stdout
        name, cap, driver, used = [x.strip() for x in smi.splitlines()[0].split(",")]
        info.update(smi_name=name, smi_compute_cap=cap, driver=driver, gpu_memory_used_mib_idle=float(used))
    except Exception:  # noqa: BLE001
        pass
    (WORK / "env.json").write_text(json.dumps(info, indent=2) + "\n")
    shown = ", ".join(f"{k} {versions[k]}" for k in ("torch", "transformers", "trl", "deepspeed", "datasets", "peft",
                                                       "huggingface_hub", "pyarrow") if versions.get(k))
    gpu = (f"{info['gpu_name']} cc {info['capability']} {info['sms']} SMs" if info.get("gpu_name")
           else "no GPU")
    detail = f"{gpu}; {shown}; imports {'FAILED: ' + '; '.join(f'{k} ({v})' for k, v in failed.items()) if failed else 'ok'}"
    if unmet:
        detail += f"; unmet: {'; '.join(unmet)}"
    verdict("fail" if failed or (not REHEARSAL and not info.get("cuda_available")) else "pass", detail, info, "env")


# --- issue 14.10: the peak ------------------------------------------------------------------------------------------
def check_peak():
    import torch
    from launcher.tracking import peak_flops
    if not torch.cuda.is_available():
        peak = peak_flops("NVIDIA H200", True, 132)
        ok = peak == 989e12
        verdict("skipped" if ok else "fail", f"{NO_GPU} (the name torch reports); peak_flops('NVIDIA H200', bf16, "
                f"132 SMs) = {peak and peak / 1e12:.0f} TFLOP/s (expected 989)", {"peak": peak}, "peak_flops")
    name = torch.cuda.get_device_name(0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    peak = peak_flops(name, True, sms)
    expected = (835e12 if "NVL" in name.upper() else 989e12) if re.search(r"\bH200\b", name.upper()) else None
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    torch.cuda.synchronize()
    measured = 2 * n**3 * 10 / (start.elapsed_time(end) / 1e3)
    metrics = {"device_name": name, "sms": sms, "peak": peak, "expected": expected, "matmul_bf16_flops": measured}
    ok = peak is not None and (expected is None or peak == expected)
    verdict("pass" if ok else "fail", f"torch reports {name!r} ({sms} SMs): peak_flops = "
            f"{'None' if peak is None else f'{peak / 1e12:.0f} TFLOP/s'} (expected "
            f"{'a known peak' if expected is None else f'{expected / 1e12:.0f}'}); 8192^3 bf16 matmul "
            f"{measured / 1e12:.0f} TFLOP/s = {measured / peak * 100 if peak else float('nan'):.0f}% of it",
            metrics, "peak_flops")


# --- issue 14.1 / 14.2: refusals before any rank ----------------------------------------------------------------------
def check_refusal(step, log, rc, run_dir, phrase):
    said = lines(log)
    rc = int(rc)
    started = [l for l in said if "--module launcher.train" in l or l.startswith("run directory")]
    problems = []
    if rc != 2:
        problems.append(f"exit code {rc}, not 2")
    if len(said) != 1:
        problems.append(f"{len(said)} lines, not 1")
    if not any(phrase in l for l in said):
        problems.append(f"no line says {phrase!r}")
    if started or Path(run_dir).exists():
        problems.append("ranks were started or the run directory was written")
    shown = said[-1][:220] if said else "(nothing)"
    verdict("fail" if problems else "pass", ("; ".join(problems) + ": " if problems else "") + f"rc {rc}: {shown}",
            {"rc": rc, "lines": said[:20]}, step)


# --- issue 14.3: precision --------------------------------------------------------------------------------------------
def check_precision(plan_json, rc):
    if int(rc) != 0 or not Path(plan_json).is_file():
        verdict("fail", f"plan exited {rc}", None)
    try:
        plan = json.loads(Path(plan_json).read_text())
    except ValueError as err:
        verdict("fail", f"plan --format json printed no JSON ({err})")
    ds, training = plan["deepspeed"], plan["recipe"]["training"]
    bf16, fp16 = ds.get("bf16", {}).get("enabled"), ds.get("fp16", {}).get("enabled")
    cap = env().get("smi_compute_cap")
    metrics = {"bf16": bf16, "fp16": fp16, "training_bf16": training.get("bf16"), "compute_cap": cap}
    said = f"resolved bf16.enabled={bf16}, fp16.enabled={fp16}, training.bf16={training.get('bf16')}"
    if cap is None:
        verdict("skipped", f"{NO_GPU} (no compute capability from nvidia-smi); {said} (a host without GPUs writes "
                "bf16 by design)", metrics, "precision_plan")
    ok = cap.startswith("9.") and bf16 is True and fp16 is False and training.get("bf16") is True
    verdict("pass" if ok else "fail", f"nvidia-smi compute_cap {cap}; {said}", metrics, "precision_plan")


# --- issue 14.4: weights offline ----------------------------------------------------------------------------------
def check_weights(log, rc, hub_id):
    said = lines(log)
    about = [l for l in said if hub_id in l and "recipe.yaml" not in l]
    promise = [l for l in about if "download it before they join" in l]
    refusal = [l for l in about if re.search(r"offline|cannot be reached|HF_HUB_OFFLINE", l)]
    started = any("--module launcher.train" in l for l in said)
    problems = []
    if int(rc) != 2:
        problems.append(f"exit code {rc}, not 2")
    if promise:
        problems.append("launch says the ranks will download it, offline")
    if len(about) != 1 or not refusal:
        problems.append(f"{len(about)} lines about {hub_id}, {len(refusal)} of them a refusal")
    if started:
        problems.append("ranks were started before the refusal")
    shown = " / ".join(l[:200] for l in about) or "(no line names it)"
    verdict("fail" if problems else "pass", ("; ".join(problems) + ". " if problems else "") + f"said: {shown}",
            {"rc": int(rc), "about": about, "ranks_started": started}, "weights_offline")


# --- issue 15: the smoke runs -------------------------------------------------------------------------------------
def throughput(run_dir, history, log):
    """The launcher's throughput numbers: per train log (tokens/s, MFU), from the trainer's log history (where the
    tracking callback writes them) or else from what it gave W&B (the stand-in's file); and the end-of-run `speed:`
    line when the worker prints one."""
    rates = [e["tokens_per_second"] for e in history if "tokens_per_second" in e]
    mfus = [e["mfu"] for e in history if "mfu" in e]
    padding = [e["padding_share"] for e in history if "padding_share" in e]
    source = "trainer log"
    if not rates:
        logged = [e for e in shim_logs(run_dir) if "train/tokens_per_second" in e]
        rates = [e["train/tokens_per_second"] for e in logged]
        mfus = [e["train/mfu"] for e in logged if "train/mfu" in e]
        padding = [e["train/padding_share"] for e in logged if "train/padding_share" in e]
        source = "W&B log"
    speed = next((l for l in lines(log) if l.startswith("speed:")), None)
    run_rate = run_mfu = None
    if speed:
        if found := re.search(r"speed: ([\d,.]+)\D", speed):
            run_rate = float(found[1].replace(",", ""))
        if found := re.search(r"MFU ([\d.]+)%", speed):
            run_mfu = float(found[1]) / 100
    return {"rates": rates, "mfus": mfus, "padding": padding, "source": source if rates else None,
            "speed_line": speed, "run_rate": run_rate, "run_mfu": run_mfu}


def shim_logs(run_dir):
    out = []
    for row in lines(Path(run_dir) / "wandb-shim.jsonl"):
        record = json.loads(row)
        if "log" in record:
            out.append({**record["log"], "_time": record["time"]})
    return out


def check_smoke(step, run_dir, log, rc, t0, t1, want_bf16):
    run_dir, rc = Path(run_dir), int(rc)
    text = "\n".join(lines(log))
    done = re.search(r"done: (\d+) steps, training loss ([\d.]+) -> ([\d.]+)", text)
    evals = re.search(r"last eval: loss ([\d.]+)", text)
    ds = json.loads((run_dir / "ds_config.json").read_text()) if (run_dir / "ds_config.json").is_file() else {}
    bf16 = ds.get("bf16", {}).get("enabled")
    state_file = run_dir / "checkpoints" / "trainer_state.json"
    history = json.loads(state_file.read_text()).get("log_history", []) if state_file.is_file() else []
    rates = throughput(run_dir, history, log)["rates"]
    mem, _ = gpu_peak(float(t0), float(t1))
    metrics = {"rc": rc, "steps": done and int(done[1]), "loss_first": done and float(done[2]),
               "loss_last": done and float(done[3]), "eval_loss": evals and float(evals[1]), "bf16": bf16,
               "final": (run_dir / "final" / "config.json").is_file(), "tokens_per_second_last": rates[-1] if rates
               else None, "gpu_memory_peak_mib": mem}
    problems = []
    if rc != 0:
        problems.append(f"exit code {rc}")
    if not done:
        problems.append("no 'done:' line")
    elif float(done[3]) >= float(done[2]):
        problems.append("the training loss did not fall")
    if not metrics["final"]:
        problems.append("no final/ model")
    want_bf16 = want_bf16 == "True"
    if bf16 is not want_bf16:
        problems.append(f"ds_config bf16.enabled {bf16}, wanted {want_bf16}")
    if not REHEARSAL and (mem is None or mem < gpu_baseline() + 256):
        problems.append(f"GPU memory peak {mem} MiB: did it train on the GPU?")
    placement = f"GPU peak {mem:.0f} MiB" if mem is not None else f"device placement {NO_GPU}"
    if not rc and done:
        detail = (f"{done[1]} steps, loss {done[2]} -> {done[3]}, eval loss {evals and evals[1]}; bf16 {bf16}; "
                  f"final/ {'written' if metrics['final'] else 'missing'}; {placement}; "
                  + (f"{rates[-1]:,.0f} tokens/s (tracking callback, last log)" if rates else "no tokens/s logged"))
    else:
        tail = [l for l in lines(log) if "error" in l.lower()][-2:] or lines(log)[-2:]
        detail = " / ".join(t[:200] for t in tail)
    verdict("fail" if problems else "pass", ("; ".join(problems) + ". " if problems else "") + detail, metrics, step)


# --- the 1B runs ----------------------------------------------------------------------------------------------------
def long_chats(source, dest, shortest, longest, rows, tokenizer_file):
    """Join stand-in chats (each starts with the user and ends with the assistant) into `rows` conversations, each of
    about a seeded random length between `shortest` and `longest` tokens (so padding to the longest row of a batch
    wastes positions and packing has rows to fill its bins with), cycling through the chats in seeded shuffles."""
    import random
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(tokenizer_file)
    chats = [json.loads(l)["messages"] for l in lines(source)]
    cost = [30 + sum(len(tok.encode(m["content"], add_special_tokens=False).ids) + 6 for m in c) for c in chats]
    rng, order, out, sizes = random.Random(0), [], [], []
    rows = int(rows)
    while len(out) < rows:
        target = rng.randint(int(shortest), int(longest))
        messages, size = [], 30
        while True:
            if not order:
                order = list(range(len(chats)))
                rng.shuffle(order)
            i = order[-1]
            if messages and size + cost[i] - 30 > target:
                break
            order.pop()
            messages += chats[i]
            size += cost[i] - 30
        out.append({"messages": messages})
        sizes.append(size)
    Path(dest).write_text("".join(json.dumps(r) + "\n" for r in out))
    metrics = {"rows": len(out), "tokens_min": min(sizes), "tokens_median": statistics.median(sizes),
               "tokens_max": max(sizes), "tokens_total": sum(sizes)}
    verdict("pass", f"{len(out)} rows of median {statistics.median(sizes):.0f} tokens (min {min(sizes)}, max "
            f"{max(sizes)}; {sum(sizes):,} tokens), estimated with the stand-in tokenizer", metrics, "long_chats")


def check_train(step, run_dir, log, rc, t0, t1, config_path, max_length):
    from launcher import memory, tracking
    run_dir, rc, max_length = Path(run_dir), int(rc), int(max_length)
    config = json.loads(Path(config_path).read_text())
    state_file = run_dir / "checkpoints" / "trainer_state.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    history = state.get("log_history", [])
    speed = throughput(run_dir, history, log)
    rates, mfus = speed["rates"], speed["mfus"]
    steady = lambda xs: statistics.median(xs[1:]) if len(xs) > 1 else (xs[0] if xs else None)  # noqa: E731
    with_tokens = [e for e in history if "num_tokens" in e and "step" in e]
    per_step = None
    if len(with_tokens) >= 2:
        a, b = with_tokens[0], with_tokens[-1]
        per_step = round((b["num_tokens"] - a["num_tokens"]) / max(b["step"] - a["step"], 1))
    summary = next((e for e in reversed(history) if "train_runtime" in e), {})
    total_tokens = with_tokens[-1]["num_tokens"] if with_tokens else None
    params = memory.count_params(config).total
    heads, layers = config["num_attention_heads"], config["num_hidden_layers"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    per_token = tracking.flops_per_token(params, 0, layers, heads * head_dim, max_length)
    e = env()
    peak = tracking.peak_flops(e.get("gpu_name", ""), True, e.get("sms")) if e.get("gpu_name") else None
    rate = steady(rates)
    mem, util = gpu_peak(float(t0), float(t1))
    metrics = {"rc": rc, "params": params, "flops_per_token": per_token, "peak_flops": peak,
               "tokens_per_second": rate, "tokens_per_second_all": rates, "mfu": steady(mfus), "mfu_all": mfus,
               "mfu_recomputed": per_token * rate / peak if rate and peak else None, "source": speed["source"],
               "speed_line": speed["speed_line"], "speed_line_tokens_per_second": speed["run_rate"],
               "speed_line_mfu": speed["run_mfu"], "padding_share": steady(speed["padding"]),
               "tokens_per_step": per_step, "num_tokens": total_tokens, "train_runtime": summary.get("train_runtime"),
               "tokens_per_second_whole_run": total_tokens / summary["train_runtime"]
               if total_tokens and summary.get("train_runtime") else None,
               "steps": state.get("global_step"), "loss": [h["loss"] for h in history if "loss" in h],
               "gpu_memory_peak_mib": mem, "gpu_util_peak": util}
    problems = []
    if rc != 0:
        problems.append(f"exit code {rc}")
    if not rate:
        problems.append("no tokens/s from the tracking callback")
    if not REHEARSAL:
        if not mfus:
            problems.append("the callback logged no MFU")
        elif not 0 < metrics["mfu"] < 1:
            problems.append(f"MFU {metrics['mfu']} is not a fraction")
        if mem is None or mem < gpu_baseline() + 8192:
            problems.append(f"GPU memory peak {mem} MiB: did it train on the GPU?")
    if rc == 0 and rate:
        mfu = fmt_pct(metrics["mfu"]) if mfus else NO_GPU if REHEARSAL else "none logged"
        detail = (f"{params / 1e9:.3f} B params, {metrics['steps']} steps, {per_step} tokens/step"
                  + (f", padding {fmt_pct(metrics['padding_share'])}" if speed["padding"] else "")
                  + f"; {rate:,.0f} tokens/s ({speed['source']}, median of {len(rates)} logs after the first), "
                  f"MFU {mfu} (recomputed {fmt_pct(metrics['mfu_recomputed'])}); "
                  + (f"{speed['speed_line']}; " if speed["speed_line"] else "no speed: line; ")
                  + f"num_tokens / train_runtime {metrics['tokens_per_second_whole_run'] or 0:,.0f} tokens/s "
                  f"({metrics['train_runtime']} s, saves included); "
                  + (f"GPU peak {mem:.0f} MiB, util {util:.0f}%" if mem is not None else f"placement {NO_GPU}"))
    else:
        tail = [l for l in lines(log) if "error" in l.lower() or "Error" in l][-2:] or lines(log)[-2:]
        detail = " / ".join(t[:220] for t in tail)
    verdict("fail" if problems else "pass", ("; ".join(problems) + ". " if problems else "") + detail, metrics, step)


def check_consolidate(final, log, rc):
    final, rc = Path(final), int(rc)
    config = json.loads((final / "config.json").read_text()) if (final / "config.json").is_file() else {}
    shards = sorted(final.glob("*.safetensors"))
    size = sum(p.stat().st_size for p in shards)
    said = next((l for l in lines(log) if l.startswith("consolidating")), "")
    dtype = config.get("dtype") or config.get("torch_dtype")
    metrics = {"rc": rc, "dtype": dtype, "shards": len(shards), "bytes": size, "line": said}
    ok = rc == 0 and dtype == "bfloat16" and shards
    detail = (f"{len(shards)} shards, {size / 1e9:.2f} GB, dtype {dtype}; {said[:200]}" if rc == 0
              else " / ".join(lines(log)[-2:])[:300])
    verdict("pass" if ok else "fail", detail, metrics, "consolidate")


def reload(final, config_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from launcher import memory
    started = time.perf_counter()
    cuda = torch.cuda.is_available()
    config = json.loads((Path(final) / "config.json").read_text())
    dtype = getattr(torch, config.get("dtype") or config.get("torch_dtype") or "float32")
    model = AutoModelForCausalLM.from_pretrained(final, dtype=dtype).to("cuda" if cuda else "cpu").eval()
    tokenizer = AutoTokenizer.from_pretrained(final)
    loaded = time.perf_counter() - started
    params = sum(p.numel() for p in model.parameters())
    expected = memory.count_params(json.loads(Path(config_path).read_text())).total
    text = "The quick brown fox jumps over the lazy dog. " * 40
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :512].to(model.device)
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    device = str(next(model.parameters()).device)
    metrics = {"params": params, "expected": expected, "dtype": str(model.dtype), "device": device, "loss": loss,
               "load_seconds": loaded}
    problems = [p for p, bad in ((f"{params:,} params, expected {expected:,}", params != expected),
                                 (f"loss {loss} not finite", not math.isfinite(loss)),
                                 (f"on {device}, not the GPU", not REHEARSAL and not device.startswith("cuda")))
                if bad]
    placement = device if cuda else f"{device} ({NO_GPU})"
    verdict("fail" if problems else "pass", ("; ".join(problems) + ". " if problems else "") +
            f"{type(model).__name__}, {params:,} params, {model.dtype}, on {placement}; loaded in {loaded:.1f} s; "
            f"loss {loss:.3f} on {ids.shape[1]} tokens", metrics, "reload")


def check_evaluate(result_json, log, rc, t0, t1):
    rc = int(rc)
    if rc != 0 or not Path(result_json).is_file():
        verdict("fail", f"exit code {rc}: " + " / ".join(lines(log)[-2:])[:300])
    result = json.loads(Path(result_json).read_text())
    mem, _ = gpu_peak(float(t0), float(t1))
    metrics = {**result, "gpu_memory_peak_mib": mem}
    problems = []
    if result.get("dtype") != "bfloat16":
        problems.append(f"dtype {result.get('dtype')}, the model was saved in bfloat16")
    if not REHEARSAL and result.get("device") != "cuda":
        problems.append(f"device {result.get('device')}, not cuda")
    if not math.isfinite(result.get("loss", float("nan"))):
        problems.append("loss not finite")
    placement = result.get("device") if not REHEARSAL else f"{result.get('device')} ({NO_GPU})"
    verdict("fail" if problems else "pass", ("; ".join(problems) + ". " if problems else "") +
            f"{result.get('rows')} rows on {placement} in {result.get('dtype')}: loss {result.get('loss'):.3f}, "
            f"perplexity {result.get('perplexity'):.4g}, {result.get('tokens')} tokens"
            + (f"; GPU peak {mem:.0f} MiB" if mem is not None else ""), metrics, "evaluate")


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    {"record": record, "render": render, "env": check_env, "peak": check_peak, "refusal": check_refusal,
     "precision": check_precision, "weights": check_weights, "smoke": check_smoke, "long_chats": long_chats,
     "train": check_train, "consolidate": check_consolidate, "reload": reload,
     "evaluate": check_evaluate}[command](*args)
EOF

# ---------------------------------------------------------------------------------------------------------------
# the step machinery
STATUS="" DETAIL="" RC="" STEP_END=0 STEP_T0="" PORT=29600
left() { echo $((T0 + BUDGET - EPOCHSECONDS)); }
t() {  # a command of the current step, under what is left of the step's time
  local remaining=$((STEP_END - EPOCHSECONDS))
  if ((remaining <= 0)); then echo "gpu_check: no time left for: $*"; return 124; fi
  timeout -k 20 "$remaining" "$@"
}
verdict_of() {  # run a check (python) and take its STATUS<TAB>DETAIL line
  local line
  line=$("$PY" "$CHECK" "$@" | tail -n 1)
  if [[ $line == *$'\t'* ]]; then STATUS=${line%%$'\t'*}; DETAIL=${line#*$'\t'}; else STATUS=fail; DETAIL="check $1 failed: ${line:-no output}"; fi
}
timed_out() { (($1 == 124 || $1 == 137)); }
step() {  # step NAME LIMIT_S WHAT: runs the function s_NAME under the limit, records the verdict
  local name=$1 limit=$2 what=$3 log=$LOGS/$1.log started ended seconds remaining rc=""
  STATUS="" DETAIL="" RC=""
  remaining=$(left)
  if [[ -n $SELECTED && " $SELECTED " != *" $name "* ]]; then
    STATUS=skipped DETAIL="not selected (GPU_CHECK_STEPS)"
  elif ((remaining < 20)); then
    STATUS=skipped DETAIL="out of time: ${remaining} s of the ${BUDGET} s budget left"
  else
    ((limit > remaining - 5)) && limit=$((remaining - 5))
    STEP_T0=$EPOCHREALTIME STEP_END=$((EPOCHSECONDS + limit))
    echo "== $name: $what (limit ${limit} s)"
    "s_$name" >"$log" 2>&1
    rc=${RC:-}
    if [[ -n $rc ]] && timed_out "$rc"; then STATUS=fail DETAIL="timed out after ${limit} s; ${DETAIL:-}"; fi
    [[ -z $STATUS ]] && STATUS=fail DETAIL="no verdict (see the log)"
  fi
  started=${STEP_T0:-$EPOCHREALTIME} ended=$EPOCHREALTIME
  [[ $STATUS == skipped && ! -s $log ]] && started=$ended
  seconds=$(awk -v a="$started" -v b="$ended" 'BEGIN {printf "%.1f", b - a}')
  "$PY" "$CHECK" record "$name" "$STATUS" "$seconds" "$rc" "$DETAIL" "$started" "$ended" "$what"
  printf '   %-20s %-7s %6s s  %s\n' "$name" "${STATUS^^}" "$seconds" "${DETAIL:0:300}"
  if [[ -s $log ]]; then
    { echo "===== $name: ${STATUS^^} (${seconds} s, rc ${rc:-none}): $what"; echo "$DETAIL"
      tail -n 300 "$log" | cut -c1-2000; echo; } >>"$OUT/steps.log"
  fi
  STEP_T0=""
}
needs() {  # needs FILE WHAT: a step that depends on an earlier one's output
  if [[ ! -e $1 ]]; then STATUS=skipped DETAIL="needs $2 ($1 missing)"; return 1; fi
}
next_port() { PORT=$((PORT + 1)); echo "$PORT"; }

finish() {
  trap - EXIT TERM INT
  [[ -n ${SAMPLER:-} ]] && kill "$SAMPLER" 2>/dev/null
  [[ -f $SAMPLES ]] && cp "$SAMPLES" "$OUT/gpu.csv"
  [[ -f $OUT/results.jsonl ]] && "$PY" "$CHECK" render
  # the archive: every log, the plans, metrics, trainer states, shim logs, eval results (no weights)
  (cd "$WORK" && find logs metrics env.json plans runs -maxdepth 4 -path runs/tokenized -prune -o \( -name '*.log' \
      -o -name '*.json' -o -name '*.jsonl' -o -name '*.yaml' -o -name '*.txt' \) -size -20M -print 2>/dev/null \
      | grep -v -e '/checkpoint-' -e '/final/' -e '/global_step' | tar czf "$OUT/logs.tar.gz" -T - 2>/dev/null)
  echo "results: $OUT/results.md ($((EPOCHSECONDS - T0)) s in all)"
}
trap finish EXIT
trap 'echo "gpu_check: stopped by a signal"; exit 143' TERM INT

# ---------------------------------------------------------------------------------------------------------------
# the steps
HUB_ID=meta-llama/Llama-3.2-1B-Instruct
SMOKE_X=(--training.disable_tqdm=true --wandb.project=gpu-check --wandb.mode=offline)
LLAMA_X=()
if [[ $REHEARSAL == 1 ]]; then
  SMOKE_X+=(--training.max_steps=8 --training.eval_steps=4 --training.save_steps=4 --training.logging_steps=2)
  LLAMA_CONFIG=bench/gpu/llama-tiny
  LLAMA_X+=("--model.name_or_path=$LLAMA_CONFIG" --training.bf16=false --training.max_length=256
            --training.per_device_train_batch_size=2 --training.max_steps=6 --training.logging_steps=2)
  MAX_LENGTH=256 CHAT_MIN=32 CHAT_MAX=240 CHAT_ROWS=40 WANT_BF16=False
else
  SMOKE_X+=(--training.bf16=true)
  LLAMA_CONFIG=bench/gpu/llama-1b
  # rows of 256 to 1950 tokens (mean ~1,100): 40 packed steps of 8 x 2048 need ~600 of them
  MAX_LENGTH=2048 CHAT_MIN=256 CHAT_MAX=1950 CHAT_ROWS=700 WANT_BF16=True
fi
TOKENIZER=launcher/shipped/stand-ins/llama-3.1-tokenizer
LONG=$WORK/long_chats.jsonl
PACKED=$WORK/runs/llama1b-packed FINAL=$WORK/llama1b-final

s_install() {
  if [[ $REHEARSAL == 1 ]]; then STATUS=skipped DETAIL="rehearsal: the local venv ($PY)"; return; fi
  local wheels=(.whl/*.whl)
  if [[ ! -e ${wheels[0]} ]]; then STATUS=fail DETAIL="no wheels in .whl/ (run bench/gpu_wheels.sh here; carry .whl)"; return; fi
  t python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}"
  RC=$?
  if ((RC == 0)); then STATUS=pass DETAIL="${#wheels[@]} wheels into $SITE ($(du -sh "$SITE" | cut -f1))"
  else STATUS=fail DETAIL="pip exited $RC: $(tail -n 2 "$LOGS/install.log" | tr '\n' ' ')"; fi
}
s_env() {
  command -v nvidia-smi >/dev/null && t nvidia-smi
  df -h "$WORK" /tmp "$ROOT"; free -g; nproc
  verdict_of env
}
s_peak_flops() { verdict_of peak; }
refusal() {  # refusal STEP RECIPE PHRASE launch|submit
  local dir=$WORK/runs/$1
  if [[ $4 == launch ]]; then
    t "${LAUNCHER[@]}" launch "$2" --nproc_per_node 1 --master_port "$(next_port)" --run.output_dir="$dir" \
      >"$WORK/$1.out" 2>&1
  else
    t "${LAUNCHER[@]}" submit "$2" --nodes 1 --gpus_per_node 1 --preflight --run.output_dir="$dir" >"$WORK/$1.out" 2>&1
  fi
  RC=$?
  cat "$WORK/$1.out"
  verdict_of refusal "$1" "$WORK/$1.out" "$RC" "$dir" "$3"
}
s_refuse_flash_launch() { refusal refuse_flash_launch bench/gpu/flash_attn.yaml "needs flash-attn" launch; }
s_refuse_flash_submit() { refusal refuse_flash_submit bench/gpu/flash_attn.yaml "needs flash-attn" submit; }
s_refuse_qlora_launch() { refusal refuse_qlora_launch bench/gpu/qlora.yaml "needs bitsandbytes" launch; }
s_refuse_qlora_submit() { refusal refuse_qlora_submit bench/gpu/qlora.yaml "needs bitsandbytes" submit; }
s_precision_plan() {
  mkdir -p "$WORK/plans"
  command -v nvidia-smi >/dev/null && t nvidia-smi --query-gpu=name,compute_cap --format=csv
  t "${LAUNCHER[@]}" plan bench/gpu/precision.yaml --nproc_per_node 1 --format json \
    --run.output_dir="$WORK/runs/precision" >"$WORK/plans/precision.json"
  RC=$?
  verdict_of precision "$WORK/plans/precision.json" "$RC"
}
s_weights_offline() {
  HF_HUB_OFFLINE=1 t "${LAUNCHER[@]}" launch bench/gpu/hub_offline.yaml --nproc_per_node 1 \
    --master_port "$(next_port)" --run.output_dir="$WORK/runs/hub-offline" >"$WORK/weights.out" 2>&1
  RC=$?
  cat "$WORK/weights.out"
  verdict_of weights "$WORK/weights.out" "$RC" "$HUB_ID"
}
smoke() {  # smoke STEP zero2|zero3
  local dir=$WORK/runs/$1
  t "${LAUNCHER[@]}" launch recipes/smoke.yaml --nproc_per_node 1 --master_port "$(next_port)" \
    --deepspeed.config="$2" --run.output_dir="$dir" "${SMOKE_X[@]}"
  RC=$?
  verdict_of smoke "$1" "$dir" "$LOGS/$1.log" "$RC" "$STEP_T0" "$EPOCHREALTIME" "$WANT_BF16"
}
s_smoke_zero2() { smoke smoke_zero2 zero2; }
s_smoke_zero3() { smoke smoke_zero3 zero3; }
s_long_chats() {
  verdict_of long_chats launcher/shipped/stand-ins/ultrachat_sample.jsonl "$LONG" "$CHAT_MIN" "$CHAT_MAX" "$CHAT_ROWS" \
    "$TOKENIZER/tokenizer.json"
}
llama() {  # llama STEP RUN_DIR [overrides]
  local name=$1 dir=$2
  shift 2
  needs "$LONG" "the long_chats step" || return
  mkdir -p "$WORK/plans"
  "${LAUNCHER[@]}" plan bench/gpu/llama_1b.yaml --nproc_per_node 1 --run.output_dir="$dir" \
    --data.train.0.path="$LONG" "${LLAMA_X[@]}" "$@" >"$WORK/plans/$name.txt" 2>&1
  head -n 9 "$WORK/plans/$name.txt"
  t "${LAUNCHER[@]}" launch bench/gpu/llama_1b.yaml --nproc_per_node 1 --master_port "$(next_port)" \
    --run.output_dir="$dir" --data.train.0.path="$LONG" "${LLAMA_X[@]}" "$@"
  RC=$?
  verdict_of train "$name" "$dir" "$LOGS/$name.log" "$RC" "$STEP_T0" "$EPOCHREALTIME" "$LLAMA_CONFIG/config.json" \
    "$MAX_LENGTH"
}
s_llama1b_packed() { llama llama1b_packed "$PACKED" --training.packing=true; }
s_consolidate() {
  needs "$PACKED/checkpoints" "the llama1b_packed run's checkpoint" || return
  t "${LAUNCHER[@]}" consolidate "$PACKED" "$FINAL" --dtype bf16
  RC=$?
  verdict_of consolidate "$FINAL" "$LOGS/consolidate.log" "$RC"
}
s_reload() {
  needs "$FINAL/config.json" "the consolidated model" || return
  t "$PY" "$CHECK" reload "$FINAL" "$LLAMA_CONFIG/config.json" >"$WORK/reload.out"
  RC=$?
  cat "$WORK/reload.out"
  local line
  line=$(tail -n 1 "$WORK/reload.out")
  if [[ $RC == 0 && $line == *$'\t'* ]]; then STATUS=${line%%$'\t'*} DETAIL=${line#*$'\t'}
  else STATUS=fail DETAIL="exit code $RC: $(grep -i error "$LOGS/reload.log" | tail -n 1 | cut -c1-250)"; fi
}
s_evaluate() {
  needs "$FINAL/config.json" "the consolidated model" || return
  t "${LAUNCHER[@]}" evaluate "$FINAL" --data launcher/shipped/stand-ins/ultrachat_sample.jsonl --max_rows 64 \
    --prompts 2 --output "$WORK/metrics/evaluate-result.json"
  RC=$?
  verdict_of evaluate "$WORK/metrics/evaluate-result.json" "$LOGS/evaluate.log" "$RC" "$STEP_T0" "$EPOCHREALTIME"
}
s_llama1b_padded() {
  rm -rf "$PACKED/checkpoints"/checkpoint-*  # consolidated (or failed) by now: its ~17 GB of disk for this run
  llama llama1b_padded "$WORK/runs/llama1b-padded" --training.packing=false
  rm -rf "$WORK/runs/llama1b-padded/checkpoints"/checkpoint-*  # ~17 GB of optimizer states: disk for the rest
}

# ---------------------------------------------------------------------------------------------------------------
echo "bench/gpu_check.sh: $([[ $REHEARSAL == 1 ]] && echo "REHEARSAL on CPU" || echo "GPU run"); work $WORK, out $OUT," \
  "budget $BUDGET s, OMP_NUM_THREADS=$OMP_NUM_THREADS"
if [[ $REHEARSAL != 1 ]] && command -v nvidia-smi >/dev/null; then
  (while :; do
     printf '%s,%s\n' "$EPOCHREALTIME" "$(nvidia-smi --query-gpu=memory.used,utilization.gpu \
       --format=csv,noheader,nounits 2>/dev/null | head -n 1 | tr -d ' ')"
     sleep 0.5
   done >"$SAMPLES") &
  SAMPLER=$!
fi

step install 120 "the carried wheels (.whl) into $SITE"
step env 90 "versions, imports, requirements, the GPU"
step peak_flops 60 "issue 14.10: peak_flops for the device torch names"
step refuse_flash_launch 60 "issue 14.1: flash_attention_2 without flash-attn, launch"
step refuse_flash_submit 60 "issue 14.1: the same, submit --preflight"
step refuse_qlora_launch 60 "issue 14.2: lora.quantize 4bit without bitsandbytes, launch"
step refuse_qlora_submit 60 "issue 14.2: the same, submit --preflight"
step precision_plan 60 "issue 14.3: no bf16/fp16 in the recipe: resolved precision"
step weights_offline 90 "issue 14.4: uncached hub id, HF_HUB_OFFLINE=1"
step smoke_zero2 150 "issue 15: smoke recipe, bf16, ZeRO-2"
step smoke_zero3 150 "issue 15: smoke recipe, bf16, ZeRO-3"
step long_chats 60 "rows of ${CHAT_MIN} to ${CHAT_MAX} tokens for the 1B runs"
step llama1b_packed 240 "issue 15/14.10: random Llama 1.24 B, ${MAX_LENGTH} context, packed"
step consolidate 120 "launcher consolidate of its checkpoint, bf16"
step reload 90 "the merged model loaded with transformers"
step evaluate 120 "issue 14.9: launcher evaluate on the merged model"
step llama1b_padded 200 "the 1B run padded (no packing)"

fails=$(grep -c '"status": "fail"' "$OUT/results.jsonl" 2>/dev/null)
exit $((${fails:-0} > 0 ? 1 : 0))
}
