"""Fine-tune a registered model with LoRA: contamination check, training, MLflow run, adapter version."""

from tasks.finetune.config import (
    ContaminationSettings,
    DataSource,
    FinetuneConfig,
    LoraSettings,
    config_hash,
    load_config,
)
from tasks.finetune.data import (
    ChatRow,
    ContaminationError,
    ContaminationReport,
    TrainingData,
    check_contamination,
    load_training_data,
    read_chat_rows,
)
from tasks.finetune.datasets import DatasetUpdate, add_rows, dataset_path
from tasks.finetune.publish import FinetuneResult, finetune, trainable_base
from tasks.finetune.train import cuda_available, preflight, tokenize_row, train_lora

__all__ = [
    "ChatRow",
    "ContaminationError",
    "ContaminationReport",
    "ContaminationSettings",
    "DataSource",
    "DatasetUpdate",
    "FinetuneConfig",
    "FinetuneResult",
    "LoraSettings",
    "TrainingData",
    "add_rows",
    "check_contamination",
    "config_hash",
    "cuda_available",
    "dataset_path",
    "finetune",
    "load_config",
    "load_training_data",
    "preflight",
    "read_chat_rows",
    "tokenize_row",
    "train_lora",
    "trainable_base",
]
