"""Serving many adapters (LoRA, DoRA, IA3, FourierFT) on one base model: batched multi-adapter layers,
an adapter cache, continuous batching, and an OpenAI-compatible HTTP server (``loraloom serve``).

FastAPI, uvicorn and Ray are imported only by the server modules (``app``, ``replicas``), so the
batched layers and the engine need nothing beyond the core library.
"""

from .cache import BASE, AdapterCache, UnknownAdapter
from .engine import Engine, Request, SamplingParams
from .multi import AdapterWeights, LoraWeights, MultiLora, MultiLoraLayer, UnservableAdapter
from .scheduler import Scheduler
from .seq2seq import Seq2SeqEngine, make_engine

__all__ = [
    "BASE",
    "AdapterCache",
    "AdapterWeights",
    "Engine",
    "LoraWeights",
    "MultiLora",
    "MultiLoraLayer",
    "Request",
    "SamplingParams",
    "Scheduler",
    "Seq2SeqEngine",
    "UnknownAdapter",
    "UnservableAdapter",
    "make_engine",
]
