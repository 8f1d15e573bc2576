"""The one place where an unlearning method's name maps to objective + transform + defaults.

`recipe("npo")` returns a frozen `Recipe`: the objective, the optax transformation, what
data and models the method needs, and the hyperparameters used to build them. Defaults
follow open-unlearning's TOFU configurations (its ``configs/trainer/*.yaml``: AdamW lr 1e-5, weight decay
0.01, Hugging Face's gradient clipping at 1.0, NPO beta 0.1, SimNPO beta 4.5 / delta 0 /
gamma 0.125, UNDIAL beta 10 / alpha 0 / lr 1e-4, SatImp gamma 0.1 / beta1 5 / beta2 1, RMU
layer 7 / c 2 / alpha 1 training down_proj of layers 5-7 at lr 5e-5, ...). Any
hyperparameter can be overridden: ``recipe("npo", beta=0.2)``, or from text with
`parse_overrides` (the CLI's ``--set beta=0.2``); unknown names are rejected.

Example:
  >>> from jaxunlearn import recipes
  >>> r = recipes.recipe("simnpo", gamma=0.2)
  >>> r.kind, r.needs_retain, r.hyperparameters["beta"], r.hyperparameters["gamma"]
  ('loss', True, 4.5, 0.2)
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import jax.numpy as jnp
import optax

from jaxunlearn import objectives as ob
from jaxunlearn import transforms

KINDS = ("loss", "one_shot", "bilevel")

_OPTIMIZER = {"learning_rate": 1e-5, "weight_decay": 0.01, "warmup_steps": 0, "max_grad_norm": 1.0}
_WEIGHTS = {"gamma": 1.0, "alpha": 1.0, "retain_loss": "nll"}


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A method, ready to run.

    Attributes:
      name: the method name.
      kind: "loss" (objective + optax transformation for `train.unlearn`), "one_shot"
        (a parameter transform, `train.ssd_unlearn`) or "bilevel" (`tx` is a
        `bilevel.OFMU`, also run by `train.unlearn`).
      objective: the objective (None for one-shot methods).
      tx: the optax transformation, or the `bilevel.OFMU` (None for one-shot methods).
      needs_retain: the method reads a retain set.
      needs_alternate: the method reads alternate answers (refusals) for each forget item.
      hyperparameters: every hyperparameter, defaults with overrides applied (read-only).
      description: one line on what the method does.
    """

    name: str
    kind: str
    objective: Any
    tx: Any
    needs_retain: bool
    needs_alternate: bool
    hyperparameters: Mapping[str, Any]
    description: str


# ----------------------------------------------------------------------------- builders


def _schedule(h: Mapping[str, Any]) -> optax.Schedule | float:
    lr, warmup = h["learning_rate"], int(h.get("warmup_steps", 0))
    if warmup <= 0:
        return lr
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup]
    )


def _adamw(h: Mapping[str, Any]) -> optax.GradientTransformation:
    """AdamW with the learning rate exposed in the state (logged), after optional clipping.

    The injected hyperparameters are float32 whatever the parameters' dtype: in bfloat16,
    b2 = 0.999 rounds to 1.0 and Adam's bias correction 1 - b2^t divides by zero.
    """
    adamw = optax.inject_hyperparams(optax.adamw, hyperparam_dtype=jnp.float32)(
        learning_rate=_schedule(h), weight_decay=h["weight_decay"]
    )
    if h.get("max_grad_norm", 0) > 0:
        return optax.chain(optax.clip_by_global_norm(h["max_grad_norm"]), adamw)
    return adamw


def _retain_term(h: Mapping[str, Any]) -> ob.Term:
    kinds = {"nll": ob.nll, "kl": ob.kl_retain}
    if h["retain_loss"] not in kinds:
        raise ValueError(f"retain_loss must be 'nll' or 'kl', got {h['retain_loss']!r}.")
    return kinds[h["retain_loss"]]()


def _pair(forget: ob.Term, h: Mapping[str, Any], *, keep_retain: bool = False) -> ob.ForgetRetain:
    # alpha 0 skips the retain pass, unless a transformation needs the retain direction
    retain = _retain_term(h) if h["alpha"] != 0 or keep_retain else None
    return ob.forget_retain(forget, retain, gamma=h["gamma"], alpha=h["alpha"])


def _loss_method(forget: Callable[[Mapping], ob.Term]) -> Callable:
    return lambda h: (_pair(forget(h), h), _adamw(h))


def _rmu(h):
    objective = ob.rmu(
        layer=h["layer"], steering_coeff=h["steering_coeff"], alpha=h["alpha"],
        gamma=h["gamma"], key=h["control_seed"],
    )  # fmt: skip
    layers, module = tuple(h["layers"]), h["module"]
    tx = optax.partition(
        {"trainable": _adamw(h), "frozen": optax.set_to_zero()},
        lambda params: ob.rmu_param_labels(params, layers, module),
    )
    return objective, tx


def _pdu(h):
    if h["retain_loss_eps"] is None:
        raise ValueError(
            "pdu needs retain_loss_eps, the bound on the retain loss (open-unlearning leaves it "
            "mandatory): e.g. recipe('pdu', retain_loss_eps=1.05 * original_retain_loss), or "
            "--set retain_loss_eps=..."
        )
    objective = ob.pdu(
        retain_loss_eps=h["retain_loss_eps"], gamma=h["gamma"], alpha=h["alpha"],
        retain=_retain_term(h), dual_step_size=h["dual_step_size"],
        dual_warmup=int(h["dual_warmup"]),
    )  # fmt: skip
    return objective, _adamw(h)


def _gu_npo(h):
    """GU + NPO. geometry="adam" (default) is GU's latest ``training_step``: the projection in
    Adam-whitened coordinates followed by Adam with b1 = 0 and no weight decay, the one setting
    in which the *executed* forget step is Euclidean-orthogonal to the retain gradient (AdamW's
    momentum and decay would rotate it back); GU's code uses rank 1 refreshed every step, the
    defaults here. geometry="euclidean" projects plain gradients (GU v1/v2 used rank 8, never
    refreshed) before the usual clipped AdamW: cheaper per step, but the step taken is then
    only approximately orthogonal."""
    objective = _pair(ob.npo(h["beta"]), h, keep_retain=True)
    if h["geometry"] == "adam":
        return objective, transforms.whitened_retain_projection(
            _schedule(h), rank=h["rank"], refresh_every=h["refresh_every"],
            mode=h["projection_mode"],
        )  # fmt: skip
    if h["geometry"] != "euclidean":
        raise ValueError(f"geometry must be 'adam' or 'euclidean', got {h['geometry']!r}.")
    projection = transforms.retain_projection(
        h["rank"], h["refresh_every"], mode=h["projection_mode"]
    )
    # Clip after the projection: it sees the combined direction, not only the forget part.
    return objective, optax.chain(projection, _adamw(h))


def _hamu(h):
    objective = _pair(
        ob.grad_ascent(), h, keep_retain=True
    )  # L_forget = -CE: the transform's forget_sign=-1
    try:  # a fixed radius given as text ("--set radius=0.5"); "lr" is HAMU's lr-scaled one
        radius = float(h["radius"])
    except (TypeError, ValueError):
        radius = h["radius"]
    tx = transforms.hardness_aware(
        h["learning_rate"], h["constraint"], radius=radius, allocation=h["allocation"],
        variant=h["variant"], clip_norm=h["clip_norm"] or None,
        stop_on_criterion=h["stop_on_criterion"],
    )  # fmt: skip
    return objective, tx


def _ofmu(h):
    from jaxunlearn import bilevel

    objective = ob.forget_retain(ob.nll(), _retain_term(h))  # L_f = forget NLL, to be raised
    method = bilevel.ofmu(
        optax.adam(h["inner_learning_rate"]), _adamw(h), inner_steps=h["inner_steps"],
        beta=h["beta"], rho=h["rho"], similarity=h["similarity"], penalty=h["penalty"],
    )  # fmt: skip
    return objective, method


def _never(h: Mapping[str, Any]) -> bool:
    return False


def _always(h: Mapping[str, Any]) -> bool:
    return True


def _alpha_on(h: Mapping[str, Any]) -> bool:  # a retain term with weight
    return h["alpha"] != 0


class _Spec(NamedTuple):
    """A method's table entry: `recipe` builds a `Recipe` from it."""

    kind: str
    defaults: dict[str, Any]
    build: Callable[[dict[str, Any]], tuple[Any, Any]]  # hyperparameters -> (objective, tx)
    description: str
    needs_retain: Callable[[Mapping[str, Any]], bool] = _never
    needs_alternate: bool = False


_METHODS: dict[str, _Spec] = {
    "gradascent": _Spec(
        kind="loss",
        defaults={**_OPTIMIZER},
        build=lambda h: (ob.forget_retain(ob.grad_ascent()), _adamw(h)),
        description="gradient ascent on the forget NLL",
    ),
    "graddiff": _Spec(
        kind="loss",
        defaults={**_OPTIMIZER, **_WEIGHTS},
        build=_loss_method(lambda h: ob.grad_ascent()),
        description="gradient difference: ascent on forget, descent on retain",
        needs_retain=_alpha_on,
    ),
    "kl": _Spec(
        kind="loss",
        defaults={**_OPTIMIZER, **_WEIGHTS, "retain_loss": "kl"},
        build=_loss_method(lambda h: ob.grad_ascent()),
        description="gradient ascent with a KL-to-reference retain term (TOFU 'KL')",
        needs_retain=_alpha_on,
    ),
    "npo": _Spec(
        kind="loss",
        defaults={**_OPTIMIZER, **_WEIGHTS, "beta": 0.1},
        build=_loss_method(lambda h: ob.npo(h["beta"])),
        description="negative preference optimisation (arXiv 2404.05868)",
        needs_retain=_alpha_on,
    ),
    "simnpo": _Spec(
        kind="loss",
        defaults={**_OPTIMIZER, **_WEIGHTS, "gamma": 0.125, "beta": 4.5, "delta": 0.0},
        build=_loss_method(lambda h: ob.simnpo(h["beta"], h["delta"])),
        description="reference-free, length-normalised NPO (arXiv 2410.07163)",
        needs_retain=_alpha_on,
    ),
    "idkdpo": _Spec(
        kind="loss",
        defaults={**_OPTIMIZER, **_WEIGHTS, "beta": 0.1},
        build=_loss_method(lambda h: ob.idk_dpo(h["beta"])),
        description="DPO preferring an 'I don't know' refusal over the forget answer",
        needs_retain=_alpha_on,
        needs_alternate=True,
    ),
    "rmu": _Spec(
        kind="loss",
        defaults={
            **_OPTIMIZER,
            "learning_rate": 5e-5,
            "gamma": 1.0,
            "alpha": 1.0,
            "layer": 7,
            "steering_coeff": 2.0,
            "layers": (5, 6, 7),
            "module": "mlp.down_proj",
            "control_seed": 0,
        },
        build=_rmu,
        description="representation misdirection of one layer's activations (WMDP, arXiv 2403.03218)",
        needs_retain=_always,
    ),
    "undial": _Spec(
        kind="loss",
        defaults={**_OPTIMIZER, **_WEIGHTS, "learning_rate": 1e-4, "alpha": 0.0, "beta": 10.0},
        build=_loss_method(lambda h: ob.undial(h["beta"])),
        description="self-distillation with the label logit lowered (arXiv 2402.10052)",
        needs_retain=_alpha_on,
    ),
    "wga": _Spec(
        kind="loss",
        defaults={**_OPTIMIZER, **_WEIGHTS, "beta": 1.0},
        build=_loss_method(lambda h: ob.wga(h["beta"])),
        description="probability-weighted gradient ascent (arXiv 2502.19301)",
        needs_retain=_alpha_on,
    ),
    "satimp": _Spec(
        kind="loss",
        defaults={**_OPTIMIZER, **_WEIGHTS, "gamma": 0.1, "beta1": 5.0, "beta2": 1.0},
        build=_loss_method(lambda h: ob.satimp(h["beta1"], h["beta2"])),
        description="saturation/importance-weighted ascent (arXiv 2505.11953)",
        needs_retain=_alpha_on,
    ),
    "ceu": _Spec(
        kind="loss",
        defaults={**_OPTIMIZER, "ignore_first_n_answer_tokens": 1},
        build=lambda h: (ob.forget_retain(ob.ceu(h["ignore_first_n_answer_tokens"])), _adamw(h)),
        description="cross-entropy to the model's own distribution without the label (arXiv 2503.01224)",
    ),
    "flat": _Spec(
        kind="loss",
        defaults={**_OPTIMIZER, "divergence": "tv"},
        build=lambda h: (ob.forget_retain(ob.flat(h["divergence"])), _adamw(h)),
        description="f-divergence between template and forget answers, forget data only (arXiv 2410.11143)",
        needs_alternate=True,
    ),
    "pdu": _Spec(
        kind="loss",
        defaults={
            **_OPTIMIZER,
            **_WEIGHTS,
            "retain_loss_eps": None,
            "dual_step_size": 1.0,
            "dual_warmup": 0,
        },
        build=_pdu,
        description="primal-dual: logit-margin flattening under a retain-loss bound (arXiv 2506.05314)",
        needs_retain=_always,
    ),
    "ssd": _Spec(
        kind="one_shot",
        defaults={"alpha": 10.0, "lam": 1.0, "convention": "batch_mean"},
        build=lambda h: (None, None),
        description="selective synaptic dampening by forget/full Fisher ratio (arXiv 2308.07707)",
        needs_retain=_always,
    ),
    "gu_npo": _Spec(
        kind="loss",
        defaults={
            **_OPTIMIZER,
            **_WEIGHTS,
            "beta": 0.1,
            "geometry": "adam",
            "rank": 1,
            "refresh_every": 1,
            "projection_mode": "gu",
        },
        build=_gu_npo,
        description="NPO with the forget step projected off the retain-gradient subspace (arXiv 2511.17100)",
        needs_retain=_always,
    ),
    "hamu": _Spec(
        kind="loss",
        defaults={
            **_WEIGHTS,
            "learning_rate": 1e-4,
            "constraint": 5e-5,
            "radius": "lr",
            "allocation": "uniform",
            "variant": "Q",
            "clip_norm": 1.0,
            "stop_on_criterion": False,
        },
        build=_hamu,
        description="hardness-aware closed-form constrained step (arXiv 2606.02119)",
        needs_retain=_always,
    ),
    "ofmu": _Spec(
        kind="bilevel",
        defaults={
            **_OPTIMIZER,
            "retain_loss": "nll",
            "inner_learning_rate": 1e-5,
            "inner_steps": 3,
            "beta": 1.0,
            "rho": 1.0,
            "similarity": "cosine",
            "penalty": "stationarity",
        },
        build=_ofmu,
        description="bi-level: inner forget ascent with gradient decorrelation, outer retain descent "
        "(arXiv 2509.22483)",
        needs_retain=_always,
    ),
}

METHODS: tuple[str, ...] = tuple(sorted(_METHODS))


def _method(name: str) -> _Spec:
    key = name.lower().replace("-", "_")
    if key not in _METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}.")
    return _METHODS[key]


def defaults(name: str) -> dict[str, Any]:
    """The default hyperparameters of method `name` (a fresh dict)."""
    return dict(_method(name).defaults)


def recipe(name: str, **overrides: Any) -> Recipe:
    """Builds method `name` with its defaults, `overrides` applied.

    Args:
      name: one of `METHODS` (case-insensitive; "-" reads as "_").
      **overrides: hyperparameters to change (see `defaults(name)`).

    Returns:
      A frozen `Recipe`.

    Raises:
      ValueError: unknown method (the message lists the known ones), an unknown
        hyperparameter (listing the valid ones), or a value the method rejects.
    """
    spec = _method(name)
    base = spec.defaults
    unknown = sorted(set(overrides) - set(base))
    if unknown:
        raise ValueError(
            f"method {name!r} has no hyperparameter {', '.join(map(repr, unknown))}; valid: "
            f"{', '.join(sorted(base))}."
        )
    h = {**base, **overrides}
    objective, tx = spec.build(h)
    return Recipe(
        name=name.lower().replace("-", "_"),
        kind=spec.kind,
        objective=objective,
        tx=tx,
        needs_retain=bool(spec.needs_retain(h)),
        needs_alternate=spec.needs_alternate,
        hyperparameters=types.MappingProxyType(h),
        description=spec.description,
    )


# ----------------------------------------------------------------------------- --set parsing

_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def parse_value(key: str, text: str, default: Any) -> Any:
    """Parses `text` as the type of `default` (bool, int, float, str, tuple of ints, None).

    Raises:
      ValueError: the text does not parse as that type (the message names the key).
    """
    text = text.strip()
    try:
        if isinstance(default, bool):
            if text.lower() not in _TRUE | _FALSE:
                raise ValueError
            return text.lower() in _TRUE
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
        if isinstance(default, tuple):
            return tuple(int(x) for x in text.replace(" ", "").split(",") if x)
        if default is None:  # a required number (pdu's retain_loss_eps): number, else text
            try:
                return float(text)
            except ValueError:
                return None if text.lower() == "none" else text
        return text
    except ValueError:
        kind = "comma-separated ints" if isinstance(default, tuple) else type(default).__name__
        raise ValueError(f"--set {key}={text}: expected {kind} (default {default!r}).") from None


_ALIASES = {"lr": "learning_rate"}  # the short spellings users type


def parse_overrides(name: str, assignments: Iterable[str]) -> dict[str, Any]:
    """``["beta=0.2", "alpha=2", "lr=2e-5"]`` -> typed overrides for method `name` (``lr`` is
    short for ``learning_rate``).

    Args:
      name: the method.
      assignments: "key=value" strings.

    Returns:
      {key: value} with each value parsed as its default's type.

    Raises:
      ValueError: a malformed assignment, an unknown key (listing the valid ones), or a
        value of the wrong type.
    """
    base = defaults(name)
    out: dict[str, Any] = {}
    for item in assignments:
        key, sep, value = item.partition("=")
        key = _ALIASES.get(key.strip(), key.strip())
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected key=value, e.g. --set beta=0.2.")
        if key not in base:
            raise ValueError(
                f"--set {key}: method {name!r} has no hyperparameter {key!r}; valid: "
                f"{', '.join(sorted(base))}."
            )
        out[key] = parse_value(key, value, base[key])
    return out
