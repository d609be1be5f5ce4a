"""Which task a model, a config or an adapter is for: the one detector.

loraloom's three tasks are "seq2seq" (encoder-decoders: T5, BART), "causal" (decoder-only LMs) and
"classification" (``*ForSequenceClassification``); PEFT names them SEQ_2_SEQ_LM, CAUSAL_LM and SEQ_CLS.
"""

from __future__ import annotations

from typing import Any, Literal

Task = Literal["seq2seq", "causal", "classification"]
TASKS: tuple[str, ...] = ("seq2seq", "causal", "classification")
# PEFT's task_type -> loraloom's task.
TASK_OF_PEFT_TYPE = {"SEQ_2_SEQ_LM": "seq2seq", "CAUSAL_LM": "causal", "SEQ_CLS": "classification"}


def peft_task_type_of_class(cls: str) -> str | None:
    """PEFT's task_type for a transformers model class name (None when the name does not say)."""
    if cls.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if cls.endswith("ForConditionalGeneration") or cls.endswith("ForSeq2SeqLM"):
        return "SEQ_2_SEQ_LM"
    if cls.endswith("ForCausalLM") or cls.endswith("LMHeadModel"):
        return "CAUSAL_LM"
    if cls.endswith("ForTokenClassification"):
        return "TOKEN_CLS"
    return None


def peft_task_type_of(model: Any) -> str | None:
    """PEFT's task_type for a transformers model, from its class name."""
    return peft_task_type_of_class(type(model).__name__)


def task_of_config(config: Any) -> Task:
    """The task of a transformers config: encoder-decoders are seq2seq, *ForSequenceClassification
    architectures classification, everything else causal."""
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    if any(a.endswith("ForSequenceClassification") for a in getattr(config, "architectures", None) or []):
        return "classification"
    return "causal"


def task_of(model: Any) -> Task:
    """The task of a loaded model: its config's encoder-decoder flag, else its class name."""
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return "seq2seq"
    if peft_task_type_of(model) == "SEQ_CLS":
        return "classification"
    return "causal"


def task_of_adapter(task_type: str | None, auto_mapping: dict[str, Any] | None = None) -> Task | None:
    """The task an adapter was trained for: its PEFT task_type, else the class in PEFT's auto_mapping."""
    if task_type is None and auto_mapping:
        task_type = peft_task_type_of_class(str(auto_mapping.get("base_model_class", "")))
    return TASK_OF_PEFT_TYPE.get(task_type or "")  # type: ignore[return-value]


__all__ = [
    "TASKS",
    "TASK_OF_PEFT_TYPE",
    "Task",
    "peft_task_type_of",
    "peft_task_type_of_class",
    "task_of",
    "task_of_adapter",
    "task_of_config",
]
