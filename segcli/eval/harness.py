"""The lm-eval model "segcli": loglikelihood, loglikelihood_rolling and generate_until through the streaming memory.

    lm_eval.simple_evaluate(model="segcli", model_args="model=DIR,memory=fifo,memory_size=512,segment_size=128",
                            tasks=[...])

model_args are RunConfig's fields (model, memory, segment_size, memory_size, sink_tokens, compress_rate,
compressed_size, device, dtype, seed, revision, trust_remote_code) plus `add_bos_token` (prepend the BOS token
to every request, as HFLM's option of that name does; default false, as HFLM's for most models) and
`max_gen_toks` (default 256). lm-eval's `batch_size` is accepted and ignored: requests stream one at a time.

What each request does, tokenized as lm-eval's HFLM tokenizes it (TemplateLM: the context's trailing spaces
move to the continuation, an empty context becomes the prefix token, BOS or else EOS):

- loglikelihood: the context streams through a fresh memory in segments of n_s, and the continuation is
  teacher-forced after it (`segcli.probe.score.Prefix`: requests with the same context share its earlier
  segments). No truncation: a context of any length goes through the memory; under `full` memory and a
  context within the model's window these are HFLM's numbers.
- loglikelihood_rolling: the prefix token and the whole text stream as one document (as `segcli run` scores it);
  HFLM cuts the text into disjoint windows of max_length tokens instead, so the two agree for texts within one
  window.
- generate_until: the context streams through the memory, then one token per step, greedy (or sampled with
  `do_sample`, `temperature` and `top_p`, seeded) until a stop string, the EOS token or max_gen_toks.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

from ..backends import load_backend
from ..config import RunConfig
from ..engine.generate import GenerateSettings, sample_next
from ..probe.score import Prefix

CONFIG_FIELDS = {f.name for f in dataclasses.fields(RunConfig)}
IGNORED = ("batch_size", "max_batch_size")  # lm-eval's batching options: segcli streams one request at a time


@register_model("segcli")
class SegcliLM(TemplateLM):
    """An lm-eval model that streams every request through a segcli memory policy."""

    def __init__(self, add_bos_token: bool = False, max_gen_toks: int = 256, **options: Any):
        super().__init__()
        for k in IGNORED:
            options.pop(k, None)
        unknown = sorted(set(options) - CONFIG_FIELDS)
        if unknown:
            raise ValueError(f"segcli model_args: unknown {', '.join(unknown)}; known: "
                             f"{', '.join(sorted(CONFIG_FIELDS | {'add_bos_token', 'max_gen_toks'}))}")
        options["device"] = self._device_name(options.get("device"))
        if isinstance(options.get("model"), str) and options["model"] == "bundled":
            options["model"] = None
        self.cfg = dataclasses.replace(RunConfig(), **options).validate()
        torch.manual_seed(self.cfg.seed)
        self.backend = load_backend(self.cfg)
        self.add_bos_token = bool(add_bos_token)
        self.max_gen_toks = int(max_gen_toks)
        tok = self.backend.tokenizer
        self._eot = self.backend.eos_id if self.backend.eos_id is not None else self.backend.bos_id
        if self._eot is None:
            raise ValueError(f"{self.cfg.model}: the tokenizer has neither an EOS nor a BOS token")
        self._prefix = self.backend.bos_id if self.backend.bos_id is not None else self._eot
        self._decode = tok.decode
        self._device = self.backend.device

    @staticmethod
    def _device_name(device: str | None) -> str:
        """lm-eval's device string as segcli's: its default `cuda:0` (given whether asked for or not) runs on the
        CPU where there is no GPU, as HFLM does; another CUDA index is refused."""
        if device is None or device == "auto":
            return "auto"
        if device in ("cuda", "cuda:0"):
            return "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu":
            return "cpu"
        raise ValueError(f"segcli model: device {device!r}; use cpu, cuda or cuda:0 (one GPU)")

    # -- tokens --------------------------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def prefix_token_id(self) -> int:
        return self._prefix

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        ids = list(self.backend.tokenizer.encode(string, add_special_tokens=False).ids)
        if add_special_tokens or (add_special_tokens is None and self.add_bos_token):
            ids = [self._prefix] + ids
        return ids

    def tok_decode(self, ids: list[int]) -> str:
        return self._decode(list(ids), skip_special_tokens=False)

    # -- requests ------------------------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """((context, continuation), context_enc, continuation_enc) -> (sum of log-probs, greedy), in order; the
        requests of one context share its streamed segments."""
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        by_context: dict[tuple[int, ...], list[int]] = {}
        for i, (_, ctx, _cont) in enumerate(requests):
            by_context.setdefault(tuple(ctx), []).append(i)
        for ctx, indices in by_context.items():
            pre = Prefix(self.backend, self.cfg, list(ctx))
            for j, i in enumerate(indices):
                cont = requests[i][2]
                if not cont:
                    out[i] = (0.0, True)
                    continue
                lp, greedy = pre.continuation(list(cont), last=j == len(indices) - 1)
                out[i] = (float(lp.double().sum()), greedy)
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], out[i])
        return out  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        res = []
        for (string,) in (r.args for r in requests):
            ids = self.tok_encode(string, add_special_tokens=False)
            if not ids:
                res.append(0.0)
                continue
            lp, _ = Prefix(self.backend, self.cfg, [self._prefix]).continuation(ids, last=True)
            total = float(lp.double().sum())
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            res.append(total)
        return res

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        res = []
        eos_text = self.tok_decode([self._eot])
        for context, gen_kwargs in (r.args for r in requests):
            kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            n = int(kwargs.pop("max_gen_toks"))
            settings = GenerateSettings(max_new_tokens=n, temperature=float(kwargs.get("temperature") or 0.0)
                                        if kwargs.get("do_sample") else 0.0,
                                        top_p=float(kwargs.get("top_p") or 1.0), seed=self.cfg.seed)
            gen = torch.Generator().manual_seed(settings.seed)
            ctx = self.tok_encode(context) or [self._prefix]

            def stop(ids: list[int]) -> bool:
                text = self.tok_decode(ids)
                return any(s and s in text for s in until)

            ids = Prefix(self.backend, self.cfg, ctx).decode(
                n, pick=lambda logits: sample_next(logits, settings, gen), stop=stop, eos=self._eot, last=True)
            text = postprocess_generated_text(self.tok_decode(ids), until, None)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            res.append(text)
        return res
