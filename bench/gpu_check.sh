#!/usr/bin/env bash
# The CUDA checks, as one script for a machine with a GPU (run from the repo root in README's venv):
# the gpu-marked tests, 2-process NCCL data parallel against DDP, and the step overhead on CUDA.
set -euo pipefail
nvidia-smi --query-gpu=name,memory.total --format=csv || true
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
python -m pytest -q -p no:cacheprovider -m gpu tests/
python -m pytest -q -p no:cacheprovider tests/test_distributed.py -k "ddp or recipe"
python bench/step_overhead.py --device cuda --steps 1000 --rounds 3 | tail -3
python recipes/classify.py --device cuda --work-dir /tmp/gpu_check --max-steps 200 --amp float16 | tail -1
python recipes/classify.py --device cuda --work-dir /tmp/gpu_check_bf16 --max-steps 200 --amp bfloat16 | tail -1
python bench/checkpoint_io.py --gb 1 --repeats 3 --device cuda | grep -E "stall|block|^ratio save "   # async stall with the state on the GPU (target <= 0.10)
python bench/run.py --quick --device cuda | tail -25   # the suite on CUDA: a section of bench/RESULTS.md
