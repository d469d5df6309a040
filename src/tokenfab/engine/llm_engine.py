"""The synchronous engine: add requests, step, get outputs. One step = schedule, run the model, sample, detokenise.

It is not thread-safe; `AsyncEngine` runs it on its own thread and talks to it through queues.
"""

from __future__ import annotations

import itertools
import logging
import time

import torch

from tokenfab.engine import cpu_kernels
from tokenfab.engine.block_manager import BlockManager
from tokenfab.engine.cpu_memory import keep_freed_memory
from tokenfab.engine.config import EngineConfig, resolve_small_batch_max_tokens
from tokenfab.engine.loader import LoadedModel, load_model
from tokenfab.engine.model import LlamaModel
from tokenfab.engine.model_runner import ModelRunner
from tokenfab.engine.sampling import Sampler, make_generator
from tokenfab.engine.scheduler import Scheduler, TierClass
from tokenfab.engine.sequence import Sequence
from tokenfab.generation import RequestError, RequestMetering, RequestOutput, SamplingParams
from tokenfab.step_model import StepTimeModel

__all__ = ["LLMEngine", "RequestError", "RequestMetering", "RequestOutput"]

log = logging.getLogger("tokenfab.engine")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(config: EngineConfig) -> torch.dtype:
    if config.dtype == "auto":
        return torch.bfloat16
    try:
        return DTYPES[config.dtype]
    except KeyError:
        raise ValueError(f"dtype {config.dtype!r} is not one of auto, {', '.join(DTYPES)}") from None


class LLMEngine:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None, energy: object | None = None,
                 policy: tuple[TierClass, ...] | None = None) -> None:
        self.config = config
        self.energy = energy  # a tokenfab.meter.energy.EnergySource, or None
        if config.threads > 0:
            torch.set_num_threads(config.threads)
        if config.device == "cpu":
            keep_freed_memory()
        t0 = time.monotonic()
        self.loaded = loaded or load_model(config)
        self.tokenizer = self.loaded.tokenizer
        self.dtype = resolve_dtype(config)
        device = torch.device(config.device)
        args = self.loaded.args
        self.model = LlamaModel(args, self.loaded.weights, self.dtype, device, config.linear_kernel,
                                resolve_small_batch_max_tokens(config.small_batch_max_tokens))
        self.max_model_len = min(config.max_model_len, args.max_position)
        num_blocks = config.num_kv_blocks
        if num_blocks <= 0:
            per_token = 2 * args.num_layers * args.num_kv_heads * args.head_dim * torch.finfo(self.dtype).bits // 8
            num_blocks = int(config.kv_cache_gb * 2**30 // (per_token * config.block_size))
            num_blocks = min(num_blocks, config.max_num_seqs * -(-self.max_model_len // config.block_size))
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.step_model = StepTimeModel()
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   policy, self.step_model)
        self.runner = ModelRunner(self.model, num_blocks, config.block_size)
        self.sampler = Sampler()
        self.vocab_limit = min(args.vocab_size, self.tokenizer.vocab_size)
        self.seqs: dict[str, Sequence] = {}
        self._ids = itertools.count()
        self.load_s = time.monotonic() - t0
        log.info(
            "engine ready: %s (%s%s), %s, %d KV blocks x %d tokens, loaded in %.1fs",
            self.loaded.name,
            self.loaded.source,
            ", SYNTHETIC" if self.loaded.synthetic else "",
            str(self.dtype).replace("torch.", ""),
            num_blocks,
            config.block_size,
            self.load_s,
        )
        log.info("kernels: %s", "; ".join(f"{k}: {v}" for k, v in self.kernel_info().items()))

    def kernel_info(self) -> dict[str, str]:
        """Which kernel does what on this machine (for the log and /health)."""
        m = self.model
        dtype = str(self.dtype).replace("torch.", "")
        if m.use_cpu_kernels:
            glue = f"CPU kernels, {cpu_kernels.describe()}"
        elif m.device.type == "cpu":
            glue = f"torch ops (CPU kernels: {cpu_kernels.describe()}; dtype {dtype})"
        else:
            glue = "torch ops"
        lin = m.layers[0][1] if m.layers else m.lm_head
        small = lin.small_max_tokens
        dense = "bf16 pre-packed for oneDNN" if m.lm_head.packed is not None else f"{dtype} F.linear"
        return {
            "decode_attention": "paged, read in place" if m.use_cpu_kernels else "gathered blocks + batched matmuls",
            "norm_rope_silu_argmax": glue,
            "matmuls": (f"{lin.kind} weight-only for every step" if small >= 1 << 30 else
                        (f"{lin.kind} weight-only up to {small} tokens, " if small else "") + f"dense above: {dense}"),
            "prefill_attention": "SDPA for whole prompts, blocked for chunks" if m.prefill_sdpa else "blocked",
        }

    @property
    def kv_capacity_tokens(self) -> int:
        return self.block_manager.num_blocks * self.block_manager.block_size

    # --- requests ------------------------------------------------------------------------------
    def check_request(self, num_prompt: int, params: SamplingParams) -> None:
        total = num_prompt + params.max_tokens
        if num_prompt == 0:
            raise RequestError("the prompt is empty: give at least one token of input")
        if total > self.max_model_len:
            raise RequestError(
                f"this model's maximum context length is {self.max_model_len} tokens, but {total} were requested "
                f"({num_prompt} in the prompt, {params.max_tokens} for the completion); shorten the prompt or lower max_tokens"
            )
        if total > self.kv_capacity_tokens:
            raise RequestError(
                f"the request needs {total} KV-cache slots ({num_prompt} prompt + {params.max_tokens} completion) "
                f"but the cache holds {self.kv_capacity_tokens}; lower max_tokens or raise kv_cache_gb"
            )

    def add_request(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None, priority: int = 0
    ) -> str:
        self.check_request(len(prompt_ids), params)
        vocab = self.vocab_limit
        bad = next((t for t in prompt_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise RequestError(f"prompt token ids must be in [0, {vocab}); got {bad}")
        rid = request_id or f"req-{next(self._ids)}"
        if rid in self.seqs:
            raise RequestError(f"request id {rid!r} is already in use")
        seq = Sequence(rid, list(prompt_ids), len(prompt_ids), params, priority=priority)
        seq.generator = make_generator(params.seed, self.model.device)
        seq.prefix_offset = max(0, seq.prompt_len - 5)
        self.seqs[rid] = seq
        self.scheduler.add(seq)
        return rid

    def abort(self, request_id: str) -> RequestOutput | None:
        seq = self.seqs.pop(request_id, None)
        if seq is None or seq.is_finished:
            return None
        self.scheduler.remove(seq)
        seq.finish_reason = "abort"
        return self._output(seq, (), "", time.monotonic())

    def set_policy(self, policy: tuple[TierClass, ...] | None) -> None:
        """Tier classes for scheduling (a sequence's priority indexes them); None = first come, first served."""
        self.scheduler.policy = policy

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # --- the step ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, run the model, sample, detokenise. A sequence whose work raises fails alone.

        If the batched forward pass or the sampler raises, the step is run again one sequence at a
        time: a sequence that still raises on its own gets a final output with `error` set (and is
        removed, its blocks freed); every other sequence carries on with its own result, as if the
        step had succeeded. Nothing a sequence has computed is committed until its result is in.
        """
        t0 = time.monotonic()
        e0 = self.energy.read_j() if self.energy is not None else 0.0
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return []
        failed: dict[str, str] = {}
        try:
            logits, sample_seqs = self.runner.run(scheduled)
            _synchronize(self.model.device)  # the clock below must not run ahead of the device
            dt = time.monotonic() - t0
            toks = self._sample(logits, sample_seqs)
            isolated = False
        except Exception as exc:  # noqa: BLE001 - find which sequence caused it; the rest go on
            log.warning("a step of %d sequences raised %s: %s; running each alone to find the cause",
                        len(scheduled), type(exc).__name__, exc)
            sample_seqs, toks, failed = self._run_each_alone(scheduled)
            dt = time.monotonic() - t0
            isolated = True
        total = sum(n for _, n in scheduled)
        joules = (self.energy.read_j() - e0) if self.energy is not None else 0.0
        if not isolated:  # a step re-run sequence by sequence says nothing about batched step times
            decodes = sum(1 for _, n in scheduled if n == 1)
            self.step_model.observe(decodes, total - decodes, dt)
        for seq, n in scheduled:
            share = n / total
            seq.joules += joules * share
            seq.device_s += dt * share
            if seq.first_scheduled_s is None:
                seq.first_scheduled_s = t0
            if seq.seq_id not in failed:
                seq.num_computed += n
                self.block_manager.register_computed(seq)
        now = time.monotonic()
        outputs: list[RequestOutput] = []
        for seq, tok in zip(sample_seqs, toks):
            try:
                outputs.append(self._append(seq, tok, now))
            except Exception as exc:  # noqa: BLE001 - e.g. a detokeniser error: this sequence only
                log.warning("request %s failed after sampling: %s: %s", seq.seq_id, type(exc).__name__, exc)
                failed[seq.seq_id] = f"{type(exc).__name__}: {exc}"
        by_id = {seq.seq_id: seq for seq, _ in scheduled}
        for rid, why in failed.items():
            outputs.append(self._fail(by_id[rid], why, now))
        self.scheduler.observe_step(time.monotonic() - t0)
        return outputs

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        if not seqs:
            return []
        logits = logits[:, : self.vocab_limit]
        return self.sampler(logits, [s.params for s in seqs], [s.generator for s in seqs],
                            [s.output_ids for s in seqs], [self._blocked(s) for s in seqs])

    def _run_each_alone(self, scheduled: list[tuple[Sequence, int]]
                        ) -> tuple[list[Sequence], list[int], dict[str, str]]:
        """The step again, one sequence at a time: (sequences sampled, their tokens, {failed id: why}).

        Rewriting a sequence's KV slots with the same tokens is harmless, so the ones that succeed
        keep these results; if none fails alone (the batch as a whole raised), all of them go on.
        """
        sampled: list[Sequence] = []
        toks: list[int] = []
        failed: dict[str, str] = {}
        for seq, n in scheduled:
            try:
                logits, ready = self.runner.run([(seq, n)])
                tok = self._sample(logits, ready)
            except Exception as exc:  # noqa: BLE001
                failed[seq.seq_id] = f"{type(exc).__name__}: {exc}"
                log.warning("request %s fails alone too (%s); failing it, the other %d go on", seq.seq_id,
                            failed[seq.seq_id], len(scheduled) - 1)
                continue
            if ready:
                sampled.append(seq)
                toks.append(tok[0])
        if not failed:
            log.warning("every sequence of the failed step ran alone without error; all of them go on")
        return sampled, toks, failed

    def _fail(self, seq: Sequence, why: str, now: float) -> RequestOutput:
        self.scheduler.remove(seq)
        self.seqs.pop(seq.seq_id, None)
        seq.finish_reason = "error"
        return self._output(seq, (), "", now, error=f"the engine could not run this request: {why}")

    def _blocked(self, seq: Sequence) -> tuple[int, ...]:
        if seq.params.min_tokens and seq.num_output < seq.params.min_tokens:
            return tuple(self.tokenizer.eos_token_ids) + seq.params.stop_token_ids
        return ()

    def _append(self, seq: Sequence, tok: int, now: float) -> RequestOutput:
        if seq.first_token_s is None:
            seq.first_token_s = now
        seq.token_times.append(now)
        seq.token_ids.append(tok)
        p = seq.params
        if (tok in self.tokenizer.eos_token_ids and not p.ignore_eos) or tok in p.stop_token_ids:
            seq.finish_reason = "stop"
        else:
            self._detokenize(seq)
            if seq.finish_reason is None and (seq.num_output >= p.max_tokens or len(seq) >= self.max_model_len):
                seq.finish_reason = "length"
        if seq.finish_reason is not None:
            self.scheduler.remove(seq)
            self.seqs.pop(seq.seq_id, None)
            confirmed = len(seq.text)
        else:
            confirmed = len(seq.text) - _holdback(seq.text, p.stop)
        delta = seq.text[seq.emitted_chars : confirmed]
        seq.emitted_chars = max(seq.emitted_chars, confirmed)
        return self._output(seq, (tok,), delta, now)

    def _detokenize(self, seq: Sequence) -> None:
        ids = seq.token_ids
        prefix = self.tokenizer.decode(ids[seq.prefix_offset : seq.read_offset])
        full = self.tokenizer.decode(ids[seq.prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return
        delta = full[len(prefix) :]
        seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)
        before = len(seq.text)
        seq.text += delta
        if seq.params.stop:
            longest = max(len(s) for s in seq.params.stop)
            lo = max(0, before - longest + 1)
            hits = [i for i in (seq.text.find(s, lo) for s in seq.params.stop) if i >= 0]
            if hits:
                seq.text = seq.text[: min(hits)]
                seq.finish_reason = "stop"

    def _output(self, seq: Sequence, toks: tuple[int, ...], delta: str, now: float,
                error: str | None = None) -> RequestOutput:
        metering = None
        if seq.finish_reason is not None:
            tt = seq.token_times
            gaps = sorted(b - a for a, b in zip(tt, tt[1:]))

            def pct(q: float) -> float | None:
                return gaps[min(len(gaps) - 1, int(q * len(gaps)))] if gaps else None

            metering = RequestMetering(
                arrival_s=seq.arrival_s,
                queue_s=None if seq.first_scheduled_s is None else seq.first_scheduled_s - seq.arrival_s,
                ttft_s=None if seq.first_token_s is None else seq.first_token_s - seq.arrival_s,
                tpot_s=(tt[-1] - tt[0]) / (len(tt) - 1) if len(tt) > 1 else None,
                itl_p50_s=pct(0.5), itl_p99_s=pct(0.99), itl_max_s=gaps[-1] if gaps else None,
                e2e_s=now - seq.arrival_s, joules=seq.joules, device_s=seq.device_s,
                num_preemptions=seq.num_preemptions,
            )
        return RequestOutput(
            request_id=seq.seq_id,
            token_ids=toks,
            text=delta,
            finished=seq.finish_reason is not None,
            finish_reason=seq.finish_reason,
            prompt_tokens=seq.prompt_len,
            completion_tokens=seq.num_output,
            cached_tokens=seq.num_cached_prompt,
            time_s=now,
            metering=metering,
            error=error,
        )

    # --- convenience for tests and benchmarks --------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
        """Run prompts to completion together; return each one's output token ids."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        rids = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        out: dict[str, list[int]] = {r: [] for r in rids}
        pending = set(rids)
        while pending:
            for o in self.step():
                out[o.request_id].extend(o.token_ids)
                if o.finished:
                    pending.discard(o.request_id)
        return [out[r] for r in rids]


def _synchronize(device: torch.device) -> None:
    """Wait for queued device work (a no-op on the CPU, where every op has finished when it returns)."""
    if device.type != "cpu":
        getattr(torch, device.type).synchronize(device)


def _holdback(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that could still grow into a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
