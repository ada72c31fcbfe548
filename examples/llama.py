"""A small LLaMA-style decoder-only transformer in Flax NNX.

The architecture follows LLaMA (Touvron et al., 2023) in miniature:

    tokens -> embed -> N x [ x + attn(attn_norm(x)) ; x + mlp(mlp_norm(x)) ] -> norm -> lm_head

* pre-normalisation with RMSNorm,
* causal multi-head self-attention with rotary position embeddings (RoPE),
  query/key/value/output projections as bias-free ``nnx.Linear`` layers,
* a SwiGLU feed-forward block ``down(silu(gate(x)) * up(x))``,
* an untied output projection ``lm_head``.

Attribute names are chosen so that parameter paths contain ``embed``, ``attn``,
``mlp``, ``norm`` and ``lm_head``; ``lowrank_optax``'s default policy keys on
them (embedding, head and norm parameters get full-rank Adam, the attention
and MLP matrices are projected). Example paths::

    ('embed', 'embedding')
    ('blocks', 0, 'attn', 'q_proj', 'kernel')
    ('blocks', 0, 'mlp', 'gate_proj', 'kernel')
    ('blocks', 0, 'attn_norm', 'scale')
    ('norm', 'scale')
    ('lm_head', 'kernel')

Everything is float32.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Hyper-parameters of the decoder.

  Attributes:
    vocab_size: number of token ids (256 for byte-level text).
    dim: model (residual stream) width.
    n_layers: number of transformer blocks.
    n_heads: number of attention heads; must divide ``dim``.
    ffn_dim: hidden width of the SwiGLU MLP.
    max_seq_len: longest sequence the model is expected to see (RoPE table size).
    rope_theta: RoPE base frequency.
    norm_eps: RMSNorm epsilon.
  """

  vocab_size: int = 256
  dim: int = 256
  n_layers: int = 4
  n_heads: int = 4
  ffn_dim: int = 688
  max_seq_len: int = 256
  rope_theta: float = 10000.0
  norm_eps: float = 1e-5

  @property
  def head_dim(self) -> int:
    return self.dim // self.n_heads


def _linear(d_in: int, d_out: int, rngs: nnx.Rngs, std: float | None = None) -> nnx.Linear:
  """Bias-free linear layer with a (fan-in scaled) normal initialiser."""
  std = d_in ** -0.5 if std is None else std
  return nnx.Linear(d_in, d_out, use_bias=False,
                    kernel_init=nnx.initializers.normal(std), rngs=rngs)


def rope_tables(seq_len: int, head_dim: int, theta: float = 10000.0):
  """Cosine and sine tables of shape (seq_len, head_dim // 2) for RoPE."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles = jnp.arange(seq_len, dtype=jnp.float32)[:, None] * inv_freq[None, :]
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotate feature pairs of ``x`` (B, T, H, D) by position-dependent angles.

  Uses the "rotate half" convention: features ``i`` and ``i + D/2`` form a pair.
  """
  x1, x2 = jnp.split(x, 2, axis=-1)
  cos = cos[None, :, None, :]
  sin = sin[None, :, None, :]
  return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


class Attention(nnx.Module):
  """Causal multi-head self-attention with rotary position embeddings."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    self.n_heads = config.n_heads
    self.head_dim = config.head_dim
    d = config.dim
    out_std = d ** -0.5 / (2 * config.n_layers) ** 0.5  # GPT-2 style residual scaling
    self.q_proj = _linear(d, d, rngs)
    self.k_proj = _linear(d, d, rngs)
    self.v_proj = _linear(d, d, rngs)
    self.o_proj = _linear(d, d, rngs, std=out_std)

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    b, t, _ = x.shape
    shape = (b, t, self.n_heads, self.head_dim)
    q = apply_rope(self.q_proj(x).reshape(shape), cos, sin)
    k = apply_rope(self.k_proj(x).reshape(shape), cos, sin)
    v = self.v_proj(x).reshape(shape)
    scores = jnp.einsum('bqhd,bkhd->bhqk', q, k) / jnp.sqrt(self.head_dim).astype(x.dtype)
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum('bhqk,bkhd->bqhd', probs, v).reshape(b, t, -1)
    return self.o_proj(out)


class MLP(nnx.Module):
  """SwiGLU feed-forward block: ``down(silu(gate(x)) * up(x))``."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    d, f = config.dim, config.ffn_dim
    out_std = f ** -0.5 / (2 * config.n_layers) ** 0.5
    self.gate_proj = _linear(d, f, rngs)
    self.up_proj = _linear(d, f, rngs)
    self.down_proj = _linear(f, d, rngs, std=out_std)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
  """One pre-norm transformer block: attention then MLP, each with a residual."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    self.attn_norm = nnx.RMSNorm(config.dim, epsilon=config.norm_eps, rngs=rngs)
    self.attn = Attention(config, rngs=rngs)
    self.mlp_norm = nnx.RMSNorm(config.dim, epsilon=config.norm_eps, rngs=rngs)
    self.mlp = MLP(config, rngs=rngs)

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    x = x + self.attn(self.attn_norm(x), cos, sin)
    return x + self.mlp(self.mlp_norm(x))


class Llama(nnx.Module):
  """LLaMA-style decoder: ``__call__(tokens int32 (B, T)) -> logits (B, T, vocab)``."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs | None = None):
    # No nnx.Rngs(0) default argument: it would create a PRNG key (and start
    # JAX's backend) at import, before jax.distributed.initialize().
    rngs = nnx.Rngs(0) if rngs is None else rngs
    self.config = config
    self.embed = nnx.Embed(config.vocab_size, config.dim,
                           embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
    self.blocks = nnx.List([Block(config, rngs=rngs) for _ in range(config.n_layers)])
    self.norm = nnx.RMSNorm(config.dim, epsilon=config.norm_eps, rngs=rngs)
    # A small head init keeps the initial loss at about ln(vocab_size).
    self.lm_head = _linear(config.dim, config.vocab_size, rngs, std=0.02)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    t = tokens.shape[1]
    cos, sin = rope_tables(t, self.config.head_dim, self.config.rope_theta)
    x = self.embed(tokens)
    for block in self.blocks:
      x = block(x, cos, sin)
    return self.lm_head(self.norm(x))


def loss_fn(model: Llama, batch: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy (nats) of a batch of sequences ``(B, T + 1)``.

  The model reads ``batch[:, :-1]`` and is scored on predicting ``batch[:, 1:]``.
  """
  inputs, targets = batch[:, :-1], batch[:, 1:]
  logits = model(inputs)
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def count_params(model: nnx.Module) -> int:
  """Total number of trainable parameters."""
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
