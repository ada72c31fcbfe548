"""Test helpers: small teacher-student MLP regressions that a recipe must fit.

``params`` are ``mlp_in`` / ``mlp_out`` kernels (projected by the default
policy's name rules) and a ``bias`` (full rank); ``loss`` is the mean squared
error to a fixed random teacher. Three teachers, as the recipe tests were
tuned on them.
"""

import math

import jax
import jax.numpy as jnp
import optax


def _student(key, d_in, hidden, d_out):
  return {"mlp_in": 0.1 * jax.random.normal(key, (d_in, hidden)),
          "mlp_out": jnp.zeros((hidden, d_out)),
          "bias": jnp.zeros((d_out,))}


def _mse(x, y):
  def loss(p):
    return jnp.mean((jnp.tanh(x @ p["mlp_in"]) @ p["mlp_out"] + p["bias"]
                     - y) ** 2)
  return loss


def mlp_problem(seed=0, d_in=24, hidden=32, d_out=16, n=128):
  """Teacher of the student's shape, weights scaled by 1/sqrt(fan-in)."""
  k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(k1, (n, d_in))
  w1 = jax.random.normal(k2, (d_in, hidden)) / math.sqrt(d_in)
  w2 = jax.random.normal(k3, (hidden, d_out)) / math.sqrt(hidden)
  return _student(k4, d_in, hidden, d_out), _mse(x, jnp.tanh(x @ w1) @ w2)


def mlp_problem_24_32_16():
  """Teacher 24 -> 32 -> 16 with weights scaled by 1/5 and 1/6."""
  k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(k1, (128, 24))
  y = jnp.tanh(x @ (jax.random.normal(k2, (24, 32)) / 5)) @ (
      jax.random.normal(k3, (32, 16)) / 6)
  return _student(k4, 24, 32, 16), _mse(x, y)


def mlp_problem_16_24_8():
  """Teacher 16 -> 24 -> 8 (output scaled by 1/5), student hidden width 32."""
  k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(k1, (128, 16))
  y = jnp.tanh(x @ jax.random.normal(k2, (16, 24))) @ jax.random.normal(
      k3, (24, 8)) / 5
  return _student(k4, 16, 32, 8), _mse(x, y)


def train(tx, problem, steps):
  """``steps`` jitted updates of ``tx`` on ``problem = (params, loss)``;
  returns the loss before and after."""
  params, loss = problem
  state = tx.init(params)

  @jax.jit
  def step(p, s):
    u, s = tx.update(jax.grad(loss)(p), s, p)
    return optax.apply_updates(p, u), s

  l0 = float(loss(params))
  for _ in range(steps):
    params, state = step(params, state)
  return l0, float(loss(params))
