"""loraloom: LoRA, FourierFT and LoraHub adapters for PyTorch / Hugging Face models.

Adapters are read and written in PEFT's on-disk format, so they move between loraloom and PEFT.
"""

from .adapters import (
    AdapterConfig,
    AdapterError,
    FourierFTConfig,
    IA3Config,
    LoraConfig,
    add_adapter,
    count_parameters,
    load_adapter,
    merge,
    merge_and_unload,
    read_adapter,
    save_adapter,
    unmerge,
)
from .data import DataError, Example, load_examples
from .evaluate import EvalResult, evaluate, generate
from .harness import experiment, report
from .hub import LoraHubResult, SearchSettings, lorahub
from .hub.arrow import arrow
from .hub.combine import combine
from .train import TrainArgs, TrainResult, train

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig",
    "AdapterError",
    "DataError",
    "EvalResult",
    "Example",
    "FourierFTConfig",
    "IA3Config",
    "LoraConfig",
    "LoraHubResult",
    "SearchSettings",
    "TrainArgs",
    "TrainResult",
    "add_adapter",
    "arrow",
    "combine",
    "count_parameters",
    "evaluate",
    "experiment",
    "generate",
    "load_adapter",
    "load_examples",
    "lorahub",
    "merge",
    "merge_and_unload",
    "read_adapter",
    "report",
    "save_adapter",
    "train",
    "unmerge",
]
