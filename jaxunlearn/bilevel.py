"""OFMU: penalty-based bi-level unlearning with a two-loop (inner ascent, outer descent) scheme.

OFMU (Asif & Amiri, arXiv 2509.22483) puts forgetting first and retention second:

    inner (forget):   maximise  h(θ) = L_f(θ) - β · S(∇L_f(θ), ∇L_r(θ))
    outer (retain):   minimise  L_r(θ)   subject to θ being a stationary point of h,

where S is a similarity of the forget and retain gradients (the paper's "similarity-aware
penalty that decorrelates forget and retain gradients"). The constraint is replaced by a
penalty, F(θ) = L_r(θ) + ρ · P(θ), and solved by two loops per outer iteration k:

    θ̂  = θ_k after T inner steps   θ <- θ + inner_tx(∇h(θ))       (ascent on h)
    θ_{k+1} = θ̂ - outer_tx(∇F(θ̂))                                (descent on F)

No code accompanies the paper, and its method section was not available when this was
written, so the details below are this implementation's choices (all exposed as arguments):

* S: cosine similarity (default), its square, or the raw inner product; the norms use
  sqrt(||g||² + eps²) so S stays differentiable where a gradient vanishes. Because S is a
  function of gradients, ∇h needs second derivatives: JAX differentiates a function that
  itself calls `jax.grad` (Hessian-vector products, never a Hessian).
* P: "stationarity" (default), P = ½ ||∇h(θ)||², the penalty that enforces stationarity of
  the inner problem (one more order of differentiation: ∇P = ∇²h · ∇h); or "value",
  P = h(θ̂) - h(θ) with θ̂ held fixed, the value-function gap, whose gradient is -∇h: first
  order in h and much cheaper on large models.
* The outer gradient is taken at the inner iterate θ̂, and the outer step starts from θ̂.
* One unlearning batch per outer iteration, used by every inner step and the outer step
  (as open-unlearning uses one forget/retain pair per step).
* Both optimiser states persist across outer iterations (the inner one is not reset).
* L_f is the forget loss to *raise* (e.g. the forget NLL, `objectives.nll()`), not a
  negated one; with a combined objective its `forget_loss` / `retain_loss` are used.

Example:
  >>> import optax, jax.numpy as jnp
  >>> from jaxunlearn import bilevel
  >>> method = bilevel.ofmu(optax.sgd(0.1), optax.sgd(0.1), inner_steps=2, beta=0.5, rho=1.0)
  >>> forget = lambda p, b: -0.5 * jnp.sum((p["w"] - 1.0) ** 2)
  >>> retain = lambda p, b: 0.5 * jnp.sum((p["w"] + 1.0) ** 2)
  >>> params = {"w": jnp.zeros(3)}
  >>> state = method.init(params)
  >>> params, state, metrics = method.update_fn(forget, retain)(params, state, None)
  >>> sorted(metrics)[:3]
  ['finite', 'forget_loss', 'grad_norm']

References:
  Asif & Amiri, "OFMU: Optimization-Driven Framework for Machine Unlearning", arXiv
  2509.22483 (2025), ICLR 2026. Shen & Chen, "On Penalty-based Bilevel Gradient Descent
  Method", arXiv 2302.05185 (2023), for the penalty reformulation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax import lax

from jaxunlearn import train

LossFn = Callable[[Any, Any], jax.Array]  # (params, batch) -> scalar

SIMILARITIES = ("cosine", "cosine_sq", "dot")
PENALTIES = ("stationarity", "value")


class OFMUState(NamedTuple):
    """State of OFMU's two loops.

    Attributes:
      inner: the inner (forget ascent) optimiser state.
      outer: the outer (retain descent) optimiser state.
      count: int32 scalar, outer iterations done.
    """

    inner: optax.OptState
    outer: optax.OptState
    count: jax.Array


def gradient_similarity(g_f: Any, g_r: Any, kind: str = "cosine", eps: float = 1e-8) -> jax.Array:
    """S(g_f, g_r): the similarity OFMU's inner objective penalises.

    Args:
      g_f: forget gradient (any pytree).
      g_r: retain gradient (same structure).
      kind: "cosine" (<g_f, g_r> / (|g_f| |g_r|)), "cosine_sq" (its square) or "dot"
        (<g_f, g_r>).
      eps: smoothing of the norms, |g| = sqrt(||g||² + eps²).

    Returns:
      float32 scalar.
    """
    dot = optax.tree.vdot(g_f, g_r)
    if kind == "dot":
        return dot
    norm_f = jnp.sqrt(optax.tree.vdot(g_f, g_f) + eps**2)
    norm_r = jnp.sqrt(optax.tree.vdot(g_r, g_r) + eps**2)
    cosine = dot / (norm_f * norm_r)
    return cosine**2 if kind == "cosine_sq" else cosine


def inner_objective(
    forget_loss: LossFn,
    retain_loss: LossFn,
    *,
    beta: float | jax.Array,
    similarity: str = "cosine",
    eps: float = 1e-8,
) -> Callable[[Any, Any], tuple[jax.Array, dict]]:
    """h(θ) = L_f(θ) - β · S(∇L_f(θ), ∇L_r(θ)), with its parts as aux.

    Args:
      forget_loss: (params, batch) -> L_f, the loss to raise.
      retain_loss: (params, batch) -> L_r.
      beta: weight of the similarity penalty.
      similarity: see `gradient_similarity`.
      eps: norm smoothing.

    Returns:
      ``h(params, batch) -> (h, {"forget_loss", "retain_loss", "similarity"})``;
      differentiable (its gradient contains Hessian-vector products of L_f and L_r).
    """

    def h(params, batch):
        lf, g_f = jax.value_and_grad(forget_loss)(params, batch)
        lr, g_r = jax.value_and_grad(retain_loss)(params, batch)
        sim = gradient_similarity(g_f, g_r, similarity, eps)
        aux = {"forget_loss": lf, "retain_loss": lr, "similarity": sim}
        return lf - beta * sim, aux

    return h


@dataclasses.dataclass(frozen=True)
class OFMU(train.StepBuilder):
    """OFMU's hyperparameters and optimisers (build with `ofmu`).

    `init(params)` gives the `OFMUState`; `update_fn(forget_loss, retain_loss)` gives the pure
    outer iteration ``(params, state, batch) -> (params, state, metrics)`` (jit it; the inner
    loop is a `lax.scan`); `make_step` plugs OFMU into `train.unlearn`.

    Attributes:
      inner_tx: optax transformation of the inner ascent (it receives -∇h).
      outer_tx: optax transformation of the outer descent (it receives ∇F).
      inner_steps: T, inner steps per outer iteration (>= 0).
      beta: similarity-penalty weight β in h.
      rho: penalty weight ρ in F = L_r + ρ · P.
      similarity: "cosine", "cosine_sq" or "dot".
      penalty: "stationarity" (½ ||∇h||²) or "value" (h(θ̂) - h(θ)).
      eps: norm smoothing in the cosine.
    """

    inner_tx: optax.GradientTransformation
    outer_tx: optax.GradientTransformation
    inner_steps: int = 5
    beta: float | jax.Array = 1.0
    rho: float | jax.Array = 1.0
    similarity: str = "cosine"
    penalty: str = "stationarity"
    eps: float = 1e-8

    def init(self, params: Any) -> OFMUState:
        """Fresh inner and outer optimiser states."""
        return OFMUState(
            self.inner_tx.init(params), self.outer_tx.init(params), jnp.zeros((), jnp.int32)
        )

    def update_fn(self, forget_loss: LossFn, retain_loss: LossFn) -> Callable:
        """The pure outer iteration for losses ``(params, batch) -> scalar``.

        Args:
          forget_loss: L_f, the forget loss to raise.
          retain_loss: L_r.

        Returns:
          ``iteration(params, state, batch) -> (params, state, metrics)``; metrics are scalars
          at the outer evaluation point θ̂: "loss" (F), "forget_loss", "retain_loss",
          "similarity", "penalty" (½||∇h||², or with penalty="value" the gap h(θ̂) - h(θ_k)),
          "inner_objective" (h), "grad_norm" (||∇F||), "finite".
          A non-finite F or ∇F leaves params and state unchanged ("finite" = 0).
        """
        h = inner_objective(
            forget_loss, retain_loss, beta=self.beta, similarity=self.similarity, eps=self.eps
        )
        grad_h = jax.grad(lambda p, b: h(p, b)[0])

        def inner_step(carry, batch):
            params, state = carry
            ascent = jax.tree.map(jnp.negative, grad_h(params, batch))  # optax minimises
            updates, state = self.inner_tx.update(ascent, state, params)
            return (optax.apply_updates(params, updates), state), None

        def outer_objective(params, batch):
            value, aux = h(params, batch)
            aux = {**aux, "inner_objective": value}
            if self.penalty == "stationarity":
                g = grad_h(params, batch)
                penalty = 0.5 * optax.tree.vdot(g, g)
                aux["penalty"] = penalty
            else:  # value gap h(θ̂) - h(θ) with θ̂ this very point: only -h carries gradient
                penalty = lax.stop_gradient(value) - value
            return aux["retain_loss"] + self.rho * penalty, aux

        def iteration(params, state, batch):
            carry = (params, state.inner)
            if self.inner_steps:
                carry, _ = lax.scan(
                    lambda c, _: inner_step(c, batch), carry, None, length=self.inner_steps
                )
            inner_params, inner_state = carry
            (loss, aux), grads = jax.value_and_grad(outer_objective, has_aux=True)(
                inner_params, batch
            )
            updates, outer_state = self.outer_tx.update(grads, state.outer, inner_params)
            new_params = optax.apply_updates(inner_params, updates)
            new_state = OFMUState(inner_state, outer_state, state.count + 1)
            grad_norm = optax.global_norm(grads)
            finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            new_params, new_state = train.keep_if_finite(
                finite, (new_params, new_state), (params, state)
            )
            metrics = {k: jnp.asarray(v, jnp.float32) for k, v in aux.items()}
            if self.penalty == "value":
                # The gap the value penalty measures, h(θ̂) - h(θ_k): how far the inner loop
                # still raised h (one more evaluation of h, for the log only).
                start, _ = h(lax.stop_gradient(params), batch)
                metrics["penalty"] = jnp.asarray(aux["inner_objective"] - start, jnp.float32)
            metrics |= {
                "loss": jnp.asarray(loss, jnp.float32),
                "grad_norm": grad_norm,
                "finite": finite.astype(jnp.float32),
            }
            lr = train.learning_rate(new_state.outer)  # when the outer optimiser exposes it
            if lr is not None:
                metrics["lr"] = lr
            return new_params, new_state, metrics

        return iteration

    def make_step(
        self,
        graphdef: nnx.GraphDef,
        rest: Any,
        objective: Any,
        *,
        ref_params: Any = None,
        micro_batches: int = 1,
    ) -> train.TrainStep:
        """OFMU as a `train.TrainStep` over a split model (used by `train.unlearn`).

        Args:
          graphdef: the model's graph.
          rest: the model's other state.
          objective: a combined objective whose `forget_loss` is L_f (to raise, e.g.
            ``objectives.forget_retain(objectives.nll(), objectives.nll())``) and whose
            `retain_loss` is L_r; the weights gamma/alpha are not used (β and ρ are).
          ref_params: frozen reference parameters for terms that need them.
          micro_batches: must be 1 (the inner loop reuses one batch).

        Returns:
          A `train.TrainStep` whose optimizer state is an `OFMUState`.

        Raises:
          ValueError: micro_batches != 1, or an objective without forget/retain losses.
        """
        if micro_batches != 1:
            raise ValueError("OFMU uses one batch per outer iteration: micro_batches must be 1.")
        if not (hasattr(objective, "forget_loss") and hasattr(objective, "retain_loss")):
            raise ValueError(
                "OFMU needs an objective with forget_loss and retain_loss, e.g. "
                "objectives.forget_retain(objectives.nll(), objectives.nll())."
            )

        def update_fn(params, state, batch, objective_state, ref_params):
            ref_forward = None
            if ref_params is not None:
                ref_forward = train.model_forward(graphdef, lax.stop_gradient(ref_params), rest)

            def loss_of(part):
                def fn(p, b):
                    term = objective.forget_loss if part == "forget" else objective.retain_loss
                    return term(train.model_forward(graphdef, p, rest), b, ref_forward=ref_forward)[
                        0
                    ]

                return fn

            iteration = self.update_fn(loss_of("forget"), loss_of("retain"))
            params, state, metrics = iteration(params, state, batch)
            return params, state, objective_state, metrics

        return train.TrainStep(update_fn, self.init, ref_params)


def ofmu(
    inner_tx: optax.GradientTransformation,
    outer_tx: optax.GradientTransformation,
    *,
    inner_steps: int = 5,
    beta: float | jax.Array = 1.0,
    rho: float | jax.Array = 1.0,
    similarity: str = "cosine",
    penalty: str = "stationarity",
    eps: float = 1e-8,
) -> OFMU:
    """Builds OFMU (see the module docstring for the algorithm and the choices made).

    Args:
      inner_tx: optimiser of the inner forget ascent (any optax transformation).
      outer_tx: optimiser of the outer retain descent.
      inner_steps: inner ascent steps per outer iteration (>= 0; 0 is the plain penalty method).
      beta: similarity-penalty weight β (>= 0).
      rho: penalty weight ρ (>= 0).
      similarity: "cosine", "cosine_sq" or "dot".
      penalty: "stationarity" or "value".
      eps: norm smoothing in the cosine (> 0).

    Returns:
      An `OFMU`.

    Raises:
      ValueError: a bad hyperparameter.

    References:
      Asif & Amiri, "OFMU: Optimization-Driven Framework for Machine Unlearning", arXiv
      2509.22483 (2025).
    """
    if not isinstance(inner_steps, int) or inner_steps < 0:
        raise ValueError(f"ofmu: inner_steps must be an int >= 0, got {inner_steps!r}.")
    if similarity not in SIMILARITIES:
        raise ValueError(f"ofmu: similarity must be one of {SIMILARITIES}, got {similarity!r}.")
    if penalty not in PENALTIES:
        raise ValueError(f"ofmu: penalty must be one of {PENALTIES}, got {penalty!r}.")
    for name, value in (("beta", beta), ("rho", rho)):
        if isinstance(value, int | float) and value < 0:
            raise ValueError(f"ofmu: {name} must be >= 0, got {value}.")
    if not eps > 0:
        raise ValueError(f"ofmu: eps must be > 0, got {eps}.")
    return OFMU(inner_tx, outer_tx, inner_steps, beta, rho, similarity, penalty, eps)
