#!/usr/bin/env bash
# One GPU check, ready for the rare and short times a GPU is lent: everything in one run, one JSON.
#
#   bash scripts/gpu_check.sh                       # on a CUDA GPU (within 8 minutes on an H100/H200)
#   bash scripts/gpu_check.sh --device cpu --small  # the same steps as a smoke run on a CPU (a few minutes)
#   bash scripts/gpu_check.sh --out FILE            # where the JSON goes
#
# Steps, each under its own time limit so that the whole run stays within its budget (and one
# that hangs or runs out of memory cannot take the others with it):
#   1. the machine: GPU, driver, torch, CUDA;
#   2. memory (benchmark/memory.py): stage 2's peak memory on SD1.5- and SDXL-shaped random UNets
#      at 512 / 1024 px, with and without gradient checkpointing, at the device's default precision;
#   3. speed (benchmark/speed.py): stage 1 and stage 2 seconds per concept, sampling overhead at 1
#      and 50 concepts, for both shapes;
#   4. the test suite with ComfyUI in-process on the device (ACE_TEST_DEVICE; the tests that start
#      ComfyUI's server or a browser stay on the CPU and are left out), as pass/fail per test.
# The figures first: they exist nowhere else, while the suite also runs on every CPU.
#
# Needs the environment of scripts/setup.sh: a Python with torch and ComfyUI's requirements
# ($PYTHON, default .venv/bin/python) and ComfyUI ($COMFYUI_PATH or .cache/comfyui-path). Writes
# benchmark/results/gpu-check.json on CUDA (gpu-check-cpu[-small].json with --device cpu).
set -uo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
device=cuda
small=0
out=""
while [ $# -gt 0 ]; do
    case "$1" in
        --device) device="$2"; shift 2 ;;
        --small) small=1; shift ;;
        --out) out="$2"; shift 2 ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$device" in cuda|cpu) ;; *) echo "gpu_check: --device is cuda or cpu, got $device" >&2; exit 2 ;; esac
if [ -z "$out" ]; then
    if [ "$device" = cuda ] && [ $small = 0 ]; then out=benchmark/results/gpu-check.json
    else out="benchmark/results/gpu-check-$device$([ $small = 1 ] && echo -small).json"; fi
fi
python="${PYTHON:-$repo/.venv/bin/python}"
[ -x "$python" ] || { echo "gpu_check: no Python at $python; run scripts/setup.sh or set PYTHON" >&2; exit 2; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
export PYTHONUNBUFFERED=1
if [ "$device" = cpu ]; then
    export CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi
started=$(date -u +%Y-%m-%dT%H:%M:%SZ)
SECONDS=0

# Time limits (seconds). Full size on a GPU: 30 + 140 + 190 + 110 = 470 s at most, within 8 minutes
# (the figures expected: memory about 100 s, speed about 150 s, of which expansion's response test
# on SDXL at 1024 px, about 100 UNet passes of 8 pictures, may take a third); the CPU smoke run at
# small sizes.
if [ $small = 1 ]; then
    t_memory=400; t_speed=400; t_tests=300
    speed_args=(--small --concepts 1 4 --steps 1 --solve 1)
    memory_args=(--small --steps 1 --timeout 180)
    tests=(test_stage2_conditioning.py test_lora_export.py)
else
    t_memory=140; t_speed=190; t_tests=110
    speed_args=(--concepts 1 50 --steps 3 --solve 2)
    memory_args=(--steps 2 --timeout 80)
    # the CUDA paths first: what is left when the limit comes still reports its results
    tests=(test_memory_options.py test_stage2_conditioning.py test_real_encoders.py test_lora_export.py
           test_nodes.py test_foundation.py)
fi

step() {  # step NAME LIMIT COMMAND...: run it under a limit, log to $work/NAME.log, note its exit status
    local name="$1" limit="$2"; shift 2
    echo "== $name (limit ${limit} s, $SECONDS s so far)"
    timeout -s INT -k 20 "$limit" "$@" > "$work/$name.log" 2>&1
    echo $? > "$work/$name.status"
    tail -n 5 "$work/$name.log"
}

step machine 30 "$python" -c '
import json, subprocess, torch
from runner import host
info = {"machine": host.machine(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info |= {"gpu": p.name, "gpu_memory_gb": round(p.total_memory / 2**30, 1), "bf16": torch.cuda.is_bf16_supported()}
    try:
        info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                        capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
print(json.dumps(info))' 
step memory "$t_memory" "$python" -m benchmark.memory --device "$device" "${memory_args[@]}" --out "$work/memory.json"
step speed "$t_speed" "$python" -m benchmark.speed --device "$device" "${speed_args[@]}" --out "$work/speed.json"
(cd tests && export ACE_TEST_DEVICE="$device" && step tests "$t_tests" "$python" -m pytest -q -p no:cacheprovider \
    --junitxml="$work/junit.xml" "${tests[@]}")

"$python" - "$work" "$out" "$device" "$small" "$started" "$SECONDS" <<'EOF'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path

work, out, device, small, started, seconds = sys.argv[1:]
work = Path(work)


def status(name):
    code = int((work / f"{name}.status").read_text()) if (work / f"{name}.status").exists() else None
    return {"exit": code, "timed_out": code in (124, 130, 137)}


def log_tail(name, lines=20):
    path = work / f"{name}.log"
    return path.read_text(errors="replace").strip().splitlines()[-lines:] if path.exists() else []


report = {"started": started, "seconds": int(seconds), "device": device, "small": small == "1",
          "command": f"bash scripts/gpu_check.sh --device {device}" + (" --small" if small == "1" else "")}
machine = log_tail("machine", 1)
try:
    report["machine"] = json.loads(machine[-1])
except (IndexError, json.JSONDecodeError):
    report["machine"] = {"error": machine}
for name in ("memory", "speed"):
    path = work / f"{name}.json"
    report[name] = json.loads(path.read_text()) if path.exists() else {"error": log_tail(name)}
    report[name]["step"] = status(name)
tests = {"step": status("tests")}
junit = work / "junit.xml"
if junit.exists():
    cases = list(ET.parse(junit).getroot().iter("testcase"))
    failed = [c for c in cases if c.find("failure") is not None or c.find("error") is not None]
    skipped = [c for c in cases if c.find("skipped") is not None]
    tests |= {"total": len(cases), "passed": len(cases) - len(failed) - len(skipped), "failed": len(failed),
              "skipped": len(skipped),
              "failures": [{"test": f"{c.get('classname')}::{c.get('name')}",
                            "message": ((c.find("failure") if c.find("failure") is not None else c.find("error"))
                                        .get("message") or "")[:300]} for c in failed]}
else:
    tests["error"] = log_tail("tests")
report["tests"] = tests
Path(out).parent.mkdir(parents=True, exist_ok=True)
Path(out).write_text(json.dumps(report, indent=2) + "\n")
print(f"wrote {out} ({int(seconds)} s): tests {tests.get('passed', '?')}/{tests.get('total', '?')} passed; "
      f"memory {'ok' if 'runs' in report['memory'] else 'failed'}; speed {'ok' if 'families' in report['speed'] else 'failed'}")
EOF
