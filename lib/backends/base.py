"""The backend protocol: what the stages need from a training framework.

Two implementations: :mod:`realign.backends.trl` (PyTorch: transformers + TRL + PEFT)
and, later, ``realign.backends.mlx`` (Apple Silicon). Stages talk only to this
protocol, so a stage reads the same on either backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from pydantic import BaseModel, Field

from ..config import DEFAULT_MAX_LENGTH
from ..gates import GateResult


@dataclass
class LogProbs:
    """Per-token log-probabilities of completions given prompts.

    ``token_logps[i]`` holds log p(token_t | prompt, tokens_<t) for each completion
    token of example i (a list of floats); ``sum`` and ``count`` are per example.
    """

    token_logps: list[list[float]]

    @property
    def sums(self) -> list[float]:
        return [float(sum(x)) for x in self.token_logps]

    @property
    def counts(self) -> list[int]:
        return [len(x) for x in self.token_logps]


@dataclass
class KLResult:
    """KL(π_θ ‖ π_ref) on a probe set (docs/quality-thresholds.md#definitions).

    ``mean``: Σ_i Σ_t KL_it ÷ Σ_i T_i, nats per completion token (the gated number);
    ``per_sequence[i]``: Σ_t KL_it of example i (the sequence-level KL, nats);
    ``counts[i]``: T_i, its number of completion tokens;
    ``policy_token_logps``: the policy's log p of each completion token, when the backend
    got it from the same forward pass (else None); ``reference_token_logps`` likewise for
    the reference.
    """

    mean: float
    per_sequence: list[float]
    counts: list[int]
    policy_token_logps: list[list[float]] | None = None
    reference_token_logps: list[list[float]] | None = None

    @property
    def tokens(self) -> int:
        return int(sum(self.counts))

    @property
    def mean_sequence(self) -> float:
        """Mean over examples of the sequence-level KL."""
        return float(sum(self.per_sequence) / len(self.per_sequence)) if self.per_sequence else 0.0


@dataclass
class DPOSettings:
    """DPO hyper-parameters passed through to the framework's trainer."""

    beta: float = 0.1
    loss_type: str = "sigmoid"
    learning_rate: float = 5e-6
    per_device_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_steps: int = -1
    num_epochs: float = 1.0
    max_length: int = DEFAULT_MAX_LENGTH
    seed: int = 0
    lora: dict[str, Any] | None = None  # peft LoraConfig kwargs, or None for full fine-tuning
    extra: dict[str, Any] = field(default_factory=dict)  # any other DPOConfig field


@runtime_checkable
class Backend(Protocol):
    """What a training framework provides to the stages."""

    name: str

    def load(self, model: str | Path, *, device: str | None = None) -> Any:
        """Load a causal LM + tokenizer (local path or hub id) and return a handle."""

    def completion_logprobs(self, handle: Any, prompts: list[Any], completions: list[Any], *,
                            batch_size: int = 8, max_length: int = DEFAULT_MAX_LENGTH) -> LogProbs:
        """Per-token log-probs of each completion given its prompt (chat template applied)."""

    def generate(self, handle: Any, prompts: list[Any], *, max_new_tokens: int = 128,
                 batch_size: int = 8, temperature: float = 0.0) -> list[str]:
        """Generate one completion per prompt."""

    def kl(self, policy: Any, reference: Any, prompts: list[Any], completions: list[Any], *,
           batch_size: int = 8, max_length: int = DEFAULT_MAX_LENGTH) -> KLResult:
        """Exact per-token KL(policy ‖ reference) over the completion tokens of a probe set."""

    def save(self, handle: Any, path: str | Path) -> Path:
        """Save model + tokenizer to ``path`` (atomically)."""


class KLBetween(BaseModel):
    """The kl_divergence gate and the numbers behind it (``realign.backends.trl.kl_between``);
    also the MCP ``compute_kl`` tool's output schema (torch-free, so the server can import it)."""

    gate: GateResult
    mean_per_token: float = Field(description="Σ_i Σ_t KL_it ÷ Σ_i T_i, nats per completion token")
    mean_per_sequence: float = Field(description="mean over examples of Σ_t KL_it, nats")
    per_sequence: list[float]
    tokens: int
    examples: int
