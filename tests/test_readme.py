"""The README's Python examples run as written, on tiny models standing in for the hub ids they name.

Every ```python block of README.md runs, in order, in one namespace, in a temporary folder that holds
the files the examples read (train.jsonl, test.jsonl, train.csv, few.jsonl, modules/). ``from_pretrained``
of the Auto classes maps the hub ids the README names to tiny models saved in that folder; nothing is
downloaded. A model the prose introduces without loading it (the diffusers ``unet``) is given as a tiny
one. An example that needs another hub id or file fails here: add a stand-in below.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import transformers
from hub_modules import EXAMPLES, make_modules, tokenizer
from tiny_models import tiny_bert_cls, tiny_t5, tiny_unet

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
# hub id in the README -> the tiny stand-in's folder name
STAND_INS = {
    "google/flan-t5-small": "t5",
    "google/flan-t5-base": "t5",
    "google/flan-t5-large": "t5",
    "roberta-base": "bert",
    "bert-base-uncased": "bert",
}
# Blocks that need a running service are not run here (each has its own tests): text they contain -> why.
NEEDS_A_SERVICE = {"OpenAI(base_url=": "a client of a running `loraloom serve`"}
AUTO_CLASSES = ("AutoConfig", "AutoTokenizer", "AutoModelForSeq2SeqLM", "AutoModelForSequenceClassification")


def python_blocks() -> list[str]:
    return BLOCK.findall(README.read_text())


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def readme_folder(tmp_path, monkeypatch):
    """The files and stand-in models the README's examples name, in the current folder."""
    t5 = tiny_t5()
    t5.save_pretrained(tmp_path / "stand-ins" / "t5")
    tokenizer().save_pretrained(tmp_path / "stand-ins" / "t5")
    bert = tiny_bert_cls(num_labels=2)
    bert.save_pretrained(tmp_path / "stand-ins" / "bert")
    tokenizer().save_pretrained(tmp_path / "stand-ins" / "bert")
    write_jsonl(tmp_path / "train.jsonl", EXAMPLES)
    write_jsonl(tmp_path / "test.jsonl", EXAMPLES[:2])
    write_jsonl(tmp_path / "few.jsonl", EXAMPLES)
    (tmp_path / "train.csv").write_text("input,target\n" + "".join(f"{e['input']},{e['target']}\n" for e in EXAMPLES))
    make_modules(t5, tmp_path / "modules", 20, prefix="task")
    for cls_name in AUTO_CLASSES:
        cls = getattr(transformers, cls_name)
        original = cls.from_pretrained

        def from_pretrained(name, *args, _original=original, **kwargs):
            name = str(name)
            if name in STAND_INS:
                name = str(tmp_path / "stand-ins" / STAND_INS[name])
            return _original(name, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", from_pretrained)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_readme_has_python_examples():
    blocks = python_blocks()
    assert len(blocks) >= 2 and any("ll.lorahub(" in b for b in blocks)


def test_readme_python_examples_run_as_written(readme_folder):
    namespace: dict = {"unet": tiny_unet()}  # the prose's diffusers UNet, which its block uses as given
    for i, block in enumerate(python_blocks()):
        if any(marker in block for marker in NEEDS_A_SERVICE):
            continue
        try:
            exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"README.md python block {i + 1} failed: {type(e).__name__}: {e}\n{block}") from e
    if "result" in namespace:  # the LoraHub example saved its result where it says
        assert (readme_folder / "out" / "weights.json").exists()
