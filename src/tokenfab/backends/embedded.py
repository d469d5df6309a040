"""The embedded backend: tokenfab's own PyTorch engine, in this process, behind the Backend interface.

The only serve-side module that imports `tokenfab.engine`. It builds the engine (with the tier table
as its scheduling policy and the machine's energy source), drives it on a thread of its own or on
the caller's (`run`: `tokenfab serve` gives it the main thread), and exposes what the gateway may
use: the tokenizer, the live step-time model, load and health.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from tokenfab.backends.base import Backend, Capabilities, EnergyInfo, LoadSnapshot, ModelInfo
from tokenfab.economics.tiers import TierTable
from tokenfab.engine.async_engine import AsyncEngine
from tokenfab.engine.config import EngineConfig
from tokenfab.engine.llm_engine import LLMEngine
from tokenfab.engine.scheduler import TierClass
from tokenfab.generation import RequestOutput, SamplingParams, TextPrompt


def tier_policy(tiers: TierTable | None) -> tuple[TierClass, ...] | None:
    """The scheduler's view of a tier table (a sequence's priority is its tier's rank); None = FCFS."""
    if tiers is None:
        return None
    return tuple(TierClass(t.name, t.guaranteed_share, t.max_share, t.slo.min_tok_s_user) for t in tiers)


class EmbeddedBackend(Backend):
    def __init__(self, config: EngineConfig, tiers: TierTable | None = None, energy: Any = None,
                 loaded: Any = None, served_name: str = "") -> None:
        """`tiers`: schedule by tier (None: first come, first served); `energy`: a tokenfab.meter.energy
        source (None: no energy attributed); `loaded`: an already loaded model (tests share one)."""
        super().__init__()
        self.core = LLMEngine(config, loaded=loaded, energy=energy, policy=tier_policy(tiers))
        self.engine = AsyncEngine(self.core)
        core = self.core
        self.info = ModelInfo(
            name=served_name or core.loaded.name, max_model_len=core.max_model_len, synthetic=core.loaded.synthetic,
            source=core.loaded.source, quantization=core.loaded.quantization,
            dtype=str(core.dtype).replace("torch.", ""))
        self.capabilities = Capabilities(local_tokenizer=True, priority=tiers is not None, trust="local")
        self.energy = EnergyInfo(getattr(energy, "name", "none"), bool(getattr(energy, "measured", False)))
        self.tokenizer = core.tokenizer
        self.step_model = core.step_model
        self.max_num_seqs = core.config.max_num_seqs
        self.max_num_batched_tokens = core.config.max_num_batched_tokens
        self.vocab_size = core.vocab_limit
        self.kv_cache_tokens = core.block_manager.num_blocks * core.config.block_size

    def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str,
                 priority: int = 0, tier: str | None = None,
                 text: TextPrompt | None = None) -> AsyncIterator[RequestOutput]:
        if text is not None:
            raise ValueError("the embedded engine takes token ids; the gateway tokenises with its tokenizer")
        return self.engine.generate(prompt_ids, params, request_id, priority)

    def check_request(self, num_prompt_tokens: int, params: SamplingParams) -> None:
        self.core.check_request(num_prompt_tokens, params)

    def load(self) -> LoadSnapshot:
        core, eng = self.core, self.engine
        return LoadSnapshot(running=len(core.scheduler.running), waiting=len(core.scheduler.waiting),
                            in_flight=eng.num_in_flight, kv_cache_usage=core.block_manager.usage(),
                            steps=eng.num_steps, step_ewma_ms=eng.step_ewma_s * 1000)

    def health(self) -> dict[str, Any]:
        core, sm = self.core, self.core.step_model
        return {
            "kernels": core.kernel_info(),
            "step_model": {"a_ms": round(sm.a_s * 1000, 3), "per_decode_ms": round(sm.b_dec_s * 1000, 4),
                           "per_prefill_token_ms": round(sm.b_pre_s * 1000, 4),
                           "budget_scale": round(core.scheduler.budget_scale, 3)},
        }

    def start(self) -> None:
        self.engine.start()

    def run(self) -> None:
        self.engine.run()

    def shutdown(self) -> None:
        self.engine.shutdown()
        super().shutdown()
