"""The default model (SmolLM2-135M-Instruct): offline preparation and loading."""

from ftp_vllm.model.prepare import (
    MODEL_NAME,
    ModelPrepareError,
    chat_prompt_ids,
    default_model_dir,
    ensure_model,
    ftp_vllm_home,
    is_prepared,
    load_model,
    prepare_model,
)

__all__ = [
    "MODEL_NAME",
    "ModelPrepareError",
    "chat_prompt_ids",
    "default_model_dir",
    "ensure_model",
    "ftp_vllm_home",
    "is_prepared",
    "load_model",
    "prepare_model",
]
