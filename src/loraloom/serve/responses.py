"""OpenAI's response shapes for a generation: choices, stream chunks, logprobs and usage.

One request of the API is a ``Job``: one engine row (``Request``) per prompt x n, each a ``Choice`` whose
``index`` is ``prompt_index * n + j`` (OpenAI's order). Completions' logprobs are ``{tokens, token_logprobs,
top_logprobs, text_offset}`` (the top dict holds the chosen token too, as vLLM's does; offsets count token
texts from the start of the choice's text, echo included); chat's are ``{content: [{token, logprob, bytes,
top_logprobs}]}``. A token's text is its own decoding (special tokens kept), as vLLM reports it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .engine import Request, TokenLogprob


@dataclass(eq=False)
class Choice:
    index: int
    request: Request
    echo: str = ""  # the prompt's text, given back before the output (completions' echo)
    offset: int = 0  # text_offset of the next token sent (completions' logprobs)
    echoed: bool = False  # its echo has been sent (a stream sends it after the prefill: its logprobs need it)
    done: bool = False  # its last chunk has been sent


@dataclass
class Job:
    """The rows of one API request, in choice order."""

    choices: list[Choice]
    prompt_tokens: int  # each prompt counted once, whatever n is (as OpenAI counts)
    logprobs: bool  # the client asked for logprobs
    by_request: dict[int, Choice] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.by_request = {id(c.request): c for c in self.choices}

    @property
    def requests(self) -> list[Request]:
        return [c.request for c in self.choices]

    def choice_of(self, request: Request) -> Choice:
        return self.by_request[id(request)]

    def error(self) -> str | None:
        return next((c.request.error or "generation failed" for c in self.choices
                     if c.request.finish_reason == "error"), None)  # fmt: skip

    def usage(self) -> dict[str, int]:
        completion = sum(len(c.request.output_ids) for c in self.choices)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}  # fmt: skip


class Renderer:
    """Builds the JSON of choices and chunks for one tokenizer (token texts cached by id)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def token(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text

    # ---- logprobs --------------------------------------------------------------------------------

    def completion_logprobs(self, choice: Choice, ids: list[int], entries: list[TokenLogprob | None]) -> dict:
        """Completions' logprobs of ``ids``, their text offsets continuing from ``choice.offset``."""
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token_id, entry in zip(ids, entries, strict=True):
            text = self.token(token_id)
            out["tokens"].append(text)
            out["text_offset"].append(choice.offset)
            choice.offset += len(text)
            if entry is None:  # the prompt's first token: nothing before it to condition on
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            logprob, alternatives = entry
            out["token_logprobs"].append(logprob)
            top: dict[str, float] = {}
            for i, lp in [*alternatives, (token_id, logprob)]:  # tokens whose texts coincide: the likeliest's
                top.setdefault(self.token(i), lp)
            out["top_logprobs"].append(top)
        return out

    def chat_logprobs(self, ids: list[int], entries: list[TokenLogprob | None]) -> dict:
        content = []
        for token_id, (logprob, alternatives) in zip(ids, entries, strict=True):
            top = [self._entry(self.token(i), lp) for i, lp in alternatives]
            content.append(self._entry(self.token(token_id), logprob) | {"top_logprobs": top})
        return {"content": content, "refusal": None}

    @staticmethod
    def _entry(text: str, logprob: float) -> dict:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    # ---- whole responses -------------------------------------------------------------------------

    def completion_choice(self, choice: Choice, logprobs: bool) -> dict:
        r = choice.request
        lp = None
        if logprobs:
            ids, entries = r.output_ids[: len(r.logprobs)], list(r.logprobs)
            if choice.echo:
                ids, entries = r.prompt_ids + ids, list(r.prompt_logprobs) + entries
            lp = self.completion_logprobs(choice, ids, entries)
        return {"index": choice.index, "text": choice.echo + r.text, "logprobs": lp, "finish_reason": r.finish_reason}

    def chat_choice(self, choice: Choice, logprobs: bool) -> dict:
        r = choice.request
        lp = self.chat_logprobs(r.output_ids[: len(r.logprobs)], r.logprobs) if logprobs else None
        message = {"role": "assistant", "content": r.text}
        return {"index": choice.index, "message": message, "logprobs": lp, "finish_reason": r.finish_reason}

    # ---- stream chunks (the choice part) ---------------------------------------------------------

    @staticmethod
    def role_piece(choice: Choice) -> dict:
        """What a chat choice's stream starts with."""
        return {"index": choice.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                "finish_reason": None}  # fmt: skip

    def echo_piece(self, choice: Choice, logprobs: bool) -> dict:
        """A completion's echoed prompt (and its logprobs: sent once its row has been prefilled)."""
        r = choice.request
        lp = self.completion_logprobs(choice, r.prompt_ids, r.prompt_logprobs) if logprobs else None
        return {"index": choice.index, "text": choice.echo, "logprobs": lp, "finish_reason": None}

    def next_piece(self, choice: Choice, chat: bool, logprobs: bool) -> dict | None:
        """The text (and logprobs) a choice made since its last piece; None when there is nothing new."""
        r = choice.request
        text = r.take_text()
        ids, entries = r.take_logprobs() if logprobs else ([], [])
        if not text and not ids:
            return None
        if chat:
            lp = self.chat_logprobs(ids, entries) if logprobs else None
            return {"index": choice.index, "delta": {"content": text}, "logprobs": lp, "finish_reason": None}
        lp = self.completion_logprobs(choice, ids, entries) if logprobs else None
        return {"index": choice.index, "text": text, "logprobs": lp, "finish_reason": None}

    @staticmethod
    def last_piece(choice: Choice, chat: bool) -> dict:
        reason = choice.request.finish_reason
        if chat:
            return {"index": choice.index, "delta": {}, "logprobs": None, "finish_reason": reason}
        return {"index": choice.index, "text": "", "logprobs": None, "finish_reason": reason}


__all__ = ["Choice", "Job", "Renderer"]
