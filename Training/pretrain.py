"""torchrun entry point for BrainDINO pretraining (the work is done by BrainDINOLib.training).

One process:    python Training/pretrain.py --config Training/configs/demo.yaml
One machine:    torchrun --standalone --nproc_per_node=4 Training/pretrain.py --config Training/configs/X.yaml
Several nodes:  torchrun --nnodes=2 --node_rank=<0|1> --nproc_per_node=8 --rdzv_backend=c10d \
                    --rdzv_endpoint=<host of node 0>:29500 --rdzv_id=<job id> Training/pretrain.py --config ...
Resume:         the same command with --resume.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from BrainDINOLib.training.entry import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
