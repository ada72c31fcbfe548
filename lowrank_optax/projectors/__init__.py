"""Question 2 of the design: which basis, and when — a family of projectors.

Every projector implements the small protocol of :class:`Projector`
(:mod:`.base`): a state type, ``init``, ``refresh`` (through ``compute``),
``down``, ``up``, and optionally ``carry_over`` (inner state moved across a
refresh), ``should_refresh`` (adaptive schedules) and ``advance`` (a basis
that moves every step). One module per family:

==========================  ==================================================
module                      projectors (``projector=`` name)
==========================  ==================================================
:mod:`.exact`               ``"svd"`` (the reference), ``"eigh"``, ``"tucker"``
                            (Natural GaLore's: the SVD with tensorly's signs)
:mod:`.iterative`           ``"subspace_iteration"`` (default), ``"randomized"``
:mod:`.dct`                 ``"dct"`` (SVD-free DCT column selection)
:mod:`.coordinates`         ``"randperm"``, ``"columns"``, ``"rows"``, ``"randk"``
                            (FRUGAL: random coordinates; state = indices)
:mod:`.random`              ``"gaussian"`` (APOLLO: seeded, regenerated, state
                            = key only), ``"orthogonal"`` (FRUGAL ``random``)
:mod:`.quantized`           ``"int4_svd"`` (Q-GaLore: int4-packed basis, lazy
                            layer-adaptive refresh)
:mod:`.online_pca`          ``"online_pca"`` (Online Subspace Descent: a basis
                            moved every step by its own optimizer)
==========================  ==================================================

``projector=`` in :func:`~lowrank_optax.galore_project` and the recipes takes
a registered name or a projector instance, so a researcher can pass a
projector of their own: subclass :class:`BasisProjector` (implement
``new_basis``) or :class:`Projector` (implement ``init``, ``compute``,
``down``, ``up``), as in this example of a projector onto the leading
coordinates of the reduced axis::

    >>> import dataclasses, jax.numpy as jnp, optax, lowrank_optax as lro
    >>> @dataclasses.dataclass(frozen=True)
    ... class LeadingCoordinates(lro.projectors.BasisProjector):
    ...   def new_basis(self, plan, a, prev, *, axis, first, key):
    ...     return jnp.broadcast_to(jnp.eye(a.shape[-2], plan.rank),
    ...                             a.shape[:-2] + (a.shape[-2], plan.rank))
    >>> tx = lro.chain(lro.galore_project(2, projector=LeadingCoordinates()),
    ...                optax.sgd(1.0))
    >>> params = {"w": jnp.ones((4, 6))}
    >>> u, _ = tx.update({"w": jnp.arange(24.0).reshape(4, 6)}, tx.init(params))
    >>> # inputs reduced (4 < 6): only the kept input rows 0 and 1 move
    >>> bool(jnp.all(u["w"][2:] == 0)), bool(jnp.all(u["w"][1] < 0))
    (True, True)

:func:`register` adds a class under its ``name`` so that it can be chosen by
name.
"""

from __future__ import annotations

import dataclasses
from typing import Union

from lowrank_optax.projectors.base import BasisProjector
from lowrank_optax.projectors.base import BasisState
from lowrank_optax.projectors.base import orthonormalize
from lowrank_optax.projectors.base import Projector
from lowrank_optax.projectors.base import TwoSidedBasisState
from lowrank_optax.projectors.coordinates import ColumnsProjector
from lowrank_optax.projectors.coordinates import CoordinateProjector
from lowrank_optax.projectors.coordinates import CoordinateState
from lowrank_optax.projectors.coordinates import random_indices
from lowrank_optax.projectors.coordinates import RandKProjector
from lowrank_optax.projectors.coordinates import RandPermProjector
from lowrank_optax.projectors.coordinates import RowsProjector
from lowrank_optax.projectors.coordinates import TwoSidedCoordinateState
from lowrank_optax.projectors.dct import DCT_MAX_DIM
from lowrank_optax.projectors.dct import DCT_SCORES
from lowrank_optax.projectors.dct import dct_matrix
from lowrank_optax.projectors.dct import dct_select
from lowrank_optax.projectors.dct import DCTProjector
from lowrank_optax.projectors.dct import IndexState
from lowrank_optax.projectors.dct import TwoSidedIndexState
from lowrank_optax.projectors.exact import eigh_basis
from lowrank_optax.projectors.exact import EighProjector
from lowrank_optax.projectors.exact import flip_signs
from lowrank_optax.projectors.exact import svd_basis
from lowrank_optax.projectors.exact import SVDProjector
from lowrank_optax.projectors.exact import TuckerProjector
from lowrank_optax.projectors.iterative import randomized_basis
from lowrank_optax.projectors.iterative import RandomizedProjector
from lowrank_optax.projectors.iterative import subspace_iteration_basis
from lowrank_optax.projectors.iterative import SubspaceIterationProjector
from lowrank_optax.projectors.online_pca import default_p_optimizer
from lowrank_optax.projectors.online_pca import online_pca_grad
from lowrank_optax.projectors.online_pca import online_pca_loss
from lowrank_optax.projectors.online_pca import OnlinePCAProjector
from lowrank_optax.projectors.online_pca import OnlinePCAState
from lowrank_optax.projectors.quantized import QuantizedBasisState
from lowrank_optax.projectors.quantized import QuantizedProjector
from lowrank_optax.projectors.random import gaussian_matrices
from lowrank_optax.projectors.random import GaussianProjector
from lowrank_optax.projectors.random import GaussianState
from lowrank_optax.projectors.random import OrthogonalProjector

__all__ = [
    "Projector", "BasisProjector", "BasisState", "TwoSidedBasisState",
    "IndexState", "TwoSidedIndexState", "SVDProjector", "EighProjector",
    "SubspaceIterationProjector", "RandomizedProjector", "DCTProjector",
    "svd_basis", "eigh_basis", "randomized_basis", "subspace_iteration_basis",
    "orthonormalize", "dct_matrix", "dct_select", "DCT_MAX_DIM", "DCT_SCORES",
    "register", "make", "names",
    "CoordinateProjector", "RandPermProjector", "ColumnsProjector",
    "RowsProjector", "RandKProjector", "CoordinateState",
    "TwoSidedCoordinateState", "random_indices",
    "GaussianProjector", "GaussianState", "OrthogonalProjector",
    "gaussian_matrices",
    "QuantizedProjector", "QuantizedBasisState", "TuckerProjector",
    "flip_signs",
    "OnlinePCAProjector", "OnlinePCAState", "online_pca_loss",
    "online_pca_grad", "default_p_optimizer",
]

_REGISTRY: dict = {}


def register(cls):
  """Registers a projector class under ``cls.name`` (usable as a decorator)."""
  if not cls.name:
    raise ValueError(f"{cls.__name__} needs a non-empty class attribute"
                     " `name` to be registered.")
  _REGISTRY[cls.name] = cls
  return cls


def names() -> tuple:
  """The registered projector names."""
  return tuple(_REGISTRY)


def make(projector: Union[str, Projector], **options) -> Projector:
  """A projector from a registered name (with its options) or an instance.

  ``options`` that the named class does not have are ignored (the recipes
  pass every projector's options); an instance is returned as it is.
  """
  if isinstance(projector, Projector):
    return projector
  if not isinstance(projector, str) or projector not in _REGISTRY:
    raise ValueError(
        f"Unknown projector {projector!r}; expected one of {names()} or a"
        " lro.projectors.Projector instance.")
  cls = _REGISTRY[projector]
  fields = {f.name for f in dataclasses.fields(cls)}
  return cls(**{k: v for k, v in options.items() if k in fields})


for _cls in (SubspaceIterationProjector, SVDProjector, EighProjector,
             RandomizedProjector, DCTProjector):
  register(_cls)
register(GaussianProjector)
register(OrthogonalProjector)
for _cls in (RandPermProjector, ColumnsProjector, RowsProjector,
             RandKProjector):
  register(_cls)
register(OnlinePCAProjector)
register(QuantizedProjector)
register(TuckerProjector)
