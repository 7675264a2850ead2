"""A mixture as an lm-evaluation-harness model: `--model compose --model_args path=DIR`.

`path` is anything `compose compare` takes as a side: a mixture directory, or a base alone
(a model folder, `CARD` or `CARD:DTYPE`), so a mixture and its bases are scored by one
adapter. `trust_remote_code=True` is the user's flag for a base that ships Python.

Everything is scored and generated in the anchor's tokens (the mixture reads its other bases
through their own tokenizers itself), so mixtures whose bases tokenize differently work too.
Generation goes through the one decoder, `composer.generation.decode.Generation`,
`batch_size` requests at a time (`--batch_size N`, 8 by default and for `auto`), decoded
together and each as it would be alone.

lm-eval finds models in its registry, which only holds the models its own package imports
(it reads no plugin entry points), so `compose-lm-eval ARGS` (`python -m
composer.serving.lm_eval_model ARGS`) is `lm_eval ARGS` with this one registered:

    compose-lm-eval run --model compose --model_args path=runs/demo --tasks hellaswag

From Python, import this module, then `lm_eval.simple_evaluate(model="compose", ...)`.
"""

from __future__ import annotations

from typing import Any

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from composer.generation.decode import Generation, context_length, run_together
from composer.generation.sampling import Sampling
from composer.generation.templates import render_chat
from composer.model.likelihood import nll


@register_model("compose")
class ComposeLM(LM):
    """lm-eval's three request types on a mixture directory (`path`): scores one request at a
    time, generates `batch_size` requests together (left-padded; each as it would be alone)."""

    def __init__(
        self,
        path: str,
        max_length: int | None = None,
        batch_size: int | str = 8,
        trust_remote_code: bool | str = False,
        **_: Any,
    ) -> None:
        # lm-eval passes device and the like too: a mixture runs where its build put it
        super().__init__()
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        from composer.compare.runner import open_model

        # What compare takes as a side: a mixture, or a base alone (folder or CARD[:DTYPE]) to
        # score beside it through the same adapter.
        trusted = str(trust_remote_code).lower() == "true"
        self.mixture = open_model(path, trust_remote_code=trusted)
        self.tokenizer = self.mixture.tokenizer
        self.max_length = int(max_length or context_length(self.mixture) or 2048)
        eos = self.tokenizer.eos_token_id
        self.prefix_token_id = self.tokenizer.bos_token_id if eos is None else eos

    # -- scoring ---------------------------------------------------------------------------

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation ids, cut from the whole text's ids so that a token that
        spans the boundary is not split twice (as lm-eval's HF model does)."""
        if not context:
            return [self.prefix_token_id], self._encode(continuation)
        spaces = len(context) - len(context.rstrip())
        if spaces:  # "Q: x A:" + " yes": the space belongs with the answer's first token
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self._encode(context + continuation)
        n_context = len(self._encode(context))
        return whole[:n_context], whole[n_context:]

    @torch.no_grad()
    def _rows(
        self, context: list[int], continuation: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The head's rows (N, D) at the positions that predict the continuation's tokens, and
        those tokens (N,). Only the last `max_length` tokens are read (a longer continuation
        keeps its end)."""
        continuation = continuation[-self.max_length :]
        ids = (context + continuation)[-(self.max_length + 1) :][:-1]
        features = self.mixture.features(torch.tensor([ids]), anchor_final=False)
        hidden, _, _ = self.mixture.hidden(features)
        return hidden[0, -len(continuation) :], torch.tensor(continuation)

    @torch.no_grad()
    def _logprob(self, context: list[int], continuation: list[int]) -> float:
        """log P(continuation | context) in nats."""
        return -float(nll(self.mixture.head, *self._rows(context, continuation)))

    @torch.no_grad()
    def _score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """log P(continuation | context) in nats, and whether greedy decoding gives it."""
        rows, target = self._rows(context, continuation)
        total = -float(nll(self.mixture.head, rows, target))
        # Greedy asks for every token's argmax: the full logits, of the continuation's rows only.
        greedy = self.mixture.logits(rows).argmax(dim=-1).cpu() == target  # (N,)
        return total, bool(greedy.all())

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[Any]:
        out = []
        for request in tqdm(requests, disable=disable_tqdm, desc="loglikelihood"):
            context, continuation = request.args
            result = self._score(*self._split(context, continuation))
            self.cache_hook.add_partial("loglikelihood", request.args, result)
            out.append(result)
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[Any]:
        out = []
        for request in tqdm(requests, disable=disable_tqdm, desc="loglikelihood_rolling"):
            (text,) = request.args
            windows = get_rolling_token_windows(
                self._encode(text), self.prefix_token_id, self.max_length, context_len=1
            )
            total = sum(self._logprob(*make_disjoint_window(w)) for w in windows)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    # -- generation ------------------------------------------------------------------------

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        out = []
        with tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until") as bar:
            for start in range(0, len(requests), max(1, self.batch_size)):
                chunk = requests[start : start + max(1, self.batch_size)]
                generations = [self._generation(*request.args) for request in chunk]
                run_together(generations)
                for request, generation in zip(chunk, generations, strict=True):
                    self.cache_hook.add_partial("generate_until", request.args, generation.text)
                    out.append(generation.text)
                bar.update(len(chunk))
        return out

    def _generation(self, context: str, kwargs: dict[str, Any]) -> Generation:
        kwargs = dict(kwargs)
        until = kwargs.pop("until", None) or [self.tokenizer.decode([self.prefix_token_id])]
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(kwargs.pop("max_gen_toks", 256))
        ids = self._encode(context)[-max(1, self.max_length - max_new) :]
        return Generation(self.mixture, ids, max_new, sampling=sampling_from(kwargs), stop=until)

    # -- chat templates (lm-eval's --apply_chat_template) ------------------------------------

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.name_or_path).replace("/", "__")

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        return render_chat(self.tokenizer, chat_history, add_generation_prompt)


def sampling_from(kwargs: dict[str, Any]) -> Sampling:
    """lm-eval's generation kwargs (HF `generate` names) as our sampling settings."""
    if not kwargs.get("do_sample", False) or not kwargs.get("temperature", 1.0):
        return Sampling(repetition_penalty=kwargs.get("repetition_penalty", 1.0))
    return Sampling(
        temperature=kwargs.get("temperature", 1.0),
        top_p=kwargs.get("top_p", 1.0),
        top_k=kwargs.get("top_k", 0) or 0,
        repetition_penalty=kwargs.get("repetition_penalty", 1.0),
        seed=kwargs.get("seed", 0),
    )


def main() -> None:
    """lm-eval's command line, with the `compose` model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
