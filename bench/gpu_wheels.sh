#!/usr/bin/env bash
# Fetch (here, where PyPI is reachable) the wheels that the GPU machine lacks, into .whl/ at the repo root, for
# bench/gpu_check.sh to install there offline:
#
#   bash bench/gpu_wheels.sh            # then carry ".whl" in the device run (see bench/gpu_check.sh)
#
# The device (nvidia-h200, /work/.library/device/KINDS.md) has Python 3.12, torch 2.11, transformers 5.17,
# accelerate 1.15.0, safetensors 0.8.0, tokenizers 0.23.2, huggingface_hub 1.33, pyyaml, numpy, pandas, pyarrow,
# xxhash, psutil, msgpack, ninja, py-cpuinfo, einops, jinja2, packaging, tqdm, filelock, requests, click, typer; and
# no trl, deepspeed, datasets, peft-at-our-pin, fire, pydantic, dill, multiprocess, hjson, termcolor, wandb.
# Every wheel is fetched with --no-deps, so each missing dependency is named below, at the version constraints.txt
# pins. Left out on purpose:
#   huggingface_hub 2.4 (ours): the device's 1.33 satisfies transformers 5.24 and datasets 5.2 (>=1.31,<3), and 2.x
#     would bring httpx2/httpcore2 too;
#   tokenizers 0.23.3 (ours): the device's 0.23.2 satisfies transformers 5.24 (>=0.23.1,<0.24);
#   accelerate, safetensors: the device has our versions;
#   wandb (+ opentelemetry, protobuf, cwevals...): gpu_check.sh records what the launcher's W&B callback logs through
#     a stand-in `wandb` module instead (the callback's numbers are the point, not the upload);
#   pyarrow (~45 MB; datasets 5.2 asks >=24): too big to carry; gpu_check.sh's first step reports the device's.
# deepspeed is a source package: its wheel is built here (no ops compiled: pure Python, any CPython 3) against this
# venv's torch, which only the ops it would compile care about.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-$ROOT/.venv/bin/python}
DEST=$ROOT/.whl
# name as in constraints.txt, one per line
NAMES=(trl datasets transformers peft fire termcolor hjson pydantic pydantic_core annotated-types typing-inspection
       typing_extensions dill multiprocess fsspec regex)

pin() {  # the version constraints.txt pins for $1 (names compared as pip does: case, - _ . alike)
  local want
  want=$(echo "$1" | tr 'A-Z_.' 'a-z--')
  awk -F'==' -v w="$want" '{n=tolower($1); gsub(/[_.]/, "-", n)} n==w {print $2; exit}' "$ROOT/constraints.txt"
}

rm -rf "$DEST"
mkdir -p "$DEST"
grep -qxF '/.whl/' .gitignore || echo '/.whl/' >> .gitignore

specs=()
for name in "${NAMES[@]}"; do
  version=$(pin "$name")
  [[ -n $version ]] || { echo "no pin for $name in constraints.txt" >&2; exit 1; }
  specs+=("$name==$version")
done
platforms=()
for tag in manylinux_2_39 manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_24 \
           manylinux_2_17 manylinux2014 manylinux_2_5 manylinux1; do
  platforms+=(--platform "${tag}_x86_64")
done
echo "downloading: ${specs[*]}"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
  --abi abi3 --abi none "${platforms[@]}" --platform any -d "$DEST" "${specs[@]}"

ds=$(pin deepspeed)
echo "building deepspeed $ds (no ops: DS_BUILD_OPS=0)"
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation --no-binary deepspeed -w "$build" "deepspeed==$ds"
wheels=("$build"/deepspeed-*.whl)
wheel=${wheels[0]}
case $(basename "$wheel") in
  *-py3-none-any.whl) ;;
  *) echo "deepspeed wheel is not pure Python: $(basename "$wheel")" >&2; exit 1 ;;
esac
if unzip -l "$wheel" | grep -E '\.(so|pyd)$'; then echo "deepspeed wheel holds compiled ops" >&2; exit 1; fi
cp "$wheel" "$DEST/"

# every wheel must install on CPython 3.12 x86_64 (tags), one version per name, and its hard requirements must be
# carried or on the device (the list at the top); printed for the record
"$PY" - "$DEST" <<'EOF'
import re, sys, zipfile
from pathlib import Path
dest = Path(sys.argv[1])
seen, bad = {}, []
for whl in sorted(dest.glob("*.whl")):
    name, version, *_, py, abi, plat = whl.name[:-4].split("-")
    key = re.sub(r"[-_.]+", "-", name).lower()
    if key in seen:
        bad.append(f"two versions of {key}: {seen[key]} and {version}")
    seen[key] = version
    if not (py in ("py3", "py2.py3", "cp312", "py312") or py.startswith("py3")) or abi not in ("none", "abi3", "cp312"):
        bad.append(f"{whl.name}: not for CPython 3.12")
    if plat != "any" and "x86_64" not in plat:
        bad.append(f"{whl.name}: not x86_64")
    with zipfile.ZipFile(whl) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        needs = [l.split(":", 1)[1].strip() for l in z.read(meta).decode().splitlines()
                 if l.startswith("Requires-Dist:") and "extra ==" not in l]
    print(f"{whl.stat().st_size / 2**20:7.2f} MiB  {whl.name}\n{'':13}needs: {', '.join(needs) or '-'}")
print("\n".join(bad) or "tags and versions: ok", file=sys.stderr if bad else sys.stdout)
sys.exit(1 if bad else 0)
EOF
echo "total: $(du -cb "$DEST"/*.whl | tail -1 | awk '{printf "%.1f MiB", $1 / 2^20}') in $(find "$DEST" -name "*.whl" | wc -l) wheels ($DEST)"
