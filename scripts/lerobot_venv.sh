#!/usr/bin/env bash
# A separate venv with LeRobot 0.4.4 (the newest for Python 3.11) and vla, for baselines scored in our envs
# (scripts/lerobot_eval.py). LeRobot pins torch<2.11; 2.14.1 works for ACT and Diffusion Policy, so it is
# installed with --no-deps plus the requirements its training and ACT/DP code import.
#   bash scripts/lerobot_venv.sh [VENV_DIR]        (default .venv-lerobot)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv-lerobot}
python3 -m venv "$venv"
. "$venv/bin/activate"
pip install -q torch==2.14.1 torchvision==0.29.1
pip install -q --no-deps lerobot==0.4.4
pip install -q "datasets>=4,<5" "diffusers>=0.27.2,<0.36" "huggingface-hub[cli]>=0.34.2,<0.36" "accelerate>=1.10,<2" \
  "einops>=0.8,<0.9" "opencv-python-headless>=4.9,<4.13" "av>=15,<16" "jsonlines>=4,<5" draccus==0.10.0 \
  "gymnasium>=1.1.1,<2" "deepdiff>=7,<9" "imageio[ffmpeg]>=2.34,<3" "termcolor>=2.4,<4" "packaging>=24.2,<26" \
  "pyserial>=3.5,<4" "pynput>=1.7.7,<1.9" "wandb>=0.24,<0.25" "rerun-sdk>=0.24,<0.27"
pip install -q -e .   # vla itself (its torch bound admits 2.14.1)
python -c "import lerobot, vla, torch; print('lerobot', lerobot.__version__, 'torch', torch.__version__, 'vla ok')"
