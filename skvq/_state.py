"""The state of one EMA code book, and the settings that train it.

:class:`CodebookState` holds everything one code book has learned: the code
vectors, the EMA counts, sums and distortions, and its counters.  It is
immutable: every transition (:meth:`~CodebookState.apply`,
:meth:`~CodebookState.reseeded`, :meth:`~CodebookState.relocated`) returns a
new state, so undoing a change means keeping the old state, and an estimator
whose call fails keeps the state it had.

Internal units.  Vectors, sums and distortions are stored in units of
``unit``, a power of two chosen once, when the state is created, from the
magnitude of the data: 1.0 unless the data are so large or so small that
squared distances could leave float64's range (beyond 2**256 or below
2**-256), or, for float32, that residuals could fall into its subnormal range
or differences overflow it (beyond 2**60 or below 2**-60).
Dividing data by a power of two is exact, so everything the kernels compute
on rescaled data equals the computation on the data themselves, rescaled;
the views in the data's own units (:attr:`~CodebookState.codebook`,
:attr:`~CodebookState.ema_sum`, :attr:`~CodebookState.ema_distortion`) are
infinite only where the true values exceed float64.
"""

import itertools
from dataclasses import dataclass, field, replace
from functools import cached_property

import numpy as np

from ._kernels import COUNT_FLOOR, ema_average, ema_update, perplexity
from ._relocation import apply_relocations
from ._search import CodebookIndex, power_of_two_scale

# Data whose largest magnitude lies within 2**-e and 2**e (e by dtype) need
# no internal unit.  float64: squared distances summed over any realistic
# number of rows and features stay far inside float64's range.  float32:
# the residuals of later stages, far smaller than the data, stay far above
# float32's subnormal range, and differences of codes far below its
# overflow.
UNIT_EXPONENT = {np.dtype(np.float32): 60, np.dtype(np.float64): 256}

_VERSIONS = itertools.count()


def unit_for(max_abs, dtype):
    """The internal unit for data of ``dtype`` whose largest magnitude is
    ``max_abs``: 1.0, or a power of two that brings it near 1."""
    return 1.0 / power_of_two_scale(max_abs, UNIT_EXPONENT[np.dtype(dtype)])


@dataclass(frozen=True)
class TrainingConfig:
    """The parameters of an estimator that its code books are trained with."""

    n_codes: int
    ema_momentum: float = 0.99
    dead_code_threshold: float = 0.05
    relocate: bool = True
    init: object = "k-means++"  # "k-means++", "random" or an array (user units)
    algorithm: str = "auto"
    batch_size: int = 1024
    max_iter: int = 300
    tol: float = 1e-4
    max_no_improvement: int | None = 10
    n_jobs: int | None = None
    verbose: int = 0

    @classmethod
    def from_params(cls, params, **overrides):
        """The configuration from an estimator's ``get_params()``."""
        names = cls.__dataclass_fields__.keys()
        return cls(**{**{k: v for k, v in params.items() if k in names}, **overrides})

    @property
    def init_rows(self):
        """Rows that a stream's initialisation (and a re-seeding) draws from,
        at most."""
        return max(3 * self.n_codes, min(3 * self.batch_size, MAX_INIT_ROWS))


# Initialisation never draws from more distinct rows than this (or
# 3 * n_codes).
MAX_INIT_ROWS = 2**16


@dataclass(frozen=True)
class SearchedBy:
    """What assigned some rows: a code book's version and search index,
    without the rest of its state (requests about those rows need no more)."""

    version: int
    index: CodebookIndex


@dataclass(frozen=True, eq=False)
class CodebookState:
    """The vectors, EMA statistics and counters of one code book.

    Attributes
    ----------
    codes : ndarray of shape (n_codes, n_features)
        The code vectors in internal units, in the data's float dtype.
    counts : ndarray of shape (n_codes,)
        EMA usage counts, float64.
    sums : ndarray of shape (n_codes, n_features)
        EMA running sums, float64, internal units.
    distortions : ndarray of shape (n_codes,)
        EMA of each code's distortion, float64, internal units squared.
    algorithm : str
        The search backend of :attr:`index`.
    seed : int
        Seed of the re-seeding draws: step ``t`` draws from
        ``numpy.random.default_rng([seed, t])``.
    unit : float
        The internal unit (a power of two).
    n_steps, n_reseeded, n_relocated : int
        EMA steps, re-seeded codes and relocated codes so far.
    dead : ndarray of shape (n_codes,), dtype=bool
        The codes found dead in the last step.
    batch_loss : float
        Weighted mean squared distance of the last batch to the codes that
        assigned it (internal units squared).
    version : int
        A number no other state of this process has (tags per-row memory).
    """

    codes: np.ndarray
    counts: np.ndarray
    sums: np.ndarray
    distortions: np.ndarray
    algorithm: str
    seed: int
    unit: float = 1.0
    n_steps: int = 0
    n_reseeded: int = 0
    n_relocated: int = 0
    dead: np.ndarray | None = None
    batch_loss: float = 0.0
    version: int = field(default_factory=lambda: next(_VERSIONS), init=False)

    @classmethod
    def initial(cls, codes, *, algorithm, seed, unit=1.0):
        """A fresh state: counts 1, sums equal to the codes."""
        n_codes = codes.shape[0]
        return cls(
            codes=codes,
            counts=np.ones(n_codes),
            sums=codes.astype(np.float64),
            distortions=np.zeros(n_codes),
            algorithm=algorithm,
            seed=int(seed),
            unit=float(unit),
            dead=np.zeros(n_codes, dtype=bool),
        )

    def __getstate__(self):
        # The search index is rebuilt where the state lands.
        state = self.__dict__.copy()
        state.pop("index", None)
        state.pop("user_index", None)
        state.pop("published_index", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)

    @cached_property
    def index(self):
        """The search structure of :attr:`codes` (built on first use)."""
        return CodebookIndex(self.codes, self.algorithm)

    def searched_by(self):
        """The :class:`SearchedBy` of this state's code book."""
        return SearchedBy(self.version, self.index)

    @cached_property
    def published_index(self):
        """The search structure of :attr:`codebook` brought back to internal
        units: the code vectors as published (rounded, should they fall below
        the dtype's normal range), searched where their squared distances
        cannot overflow."""
        if self.unit == 1.0:
            return self.index
        codes = self.codebook.astype(np.float64) / self.unit
        return CodebookIndex(codes.astype(self.codes.dtype), self.algorithm)

    @cached_property
    def user_index(self):
        """The search structure of :attr:`codebook` (in the data's units): it
        searches data of any magnitude without rescaling them."""
        if self.unit == 1.0:
            return self.index
        return CodebookIndex(self.codebook, self.algorithm)

    @property
    def n_codes(self):
        return self.codes.shape[0]

    @property
    def perplexity(self):
        """``exp`` of the entropy of the usage distribution."""
        return perplexity(self.counts)

    # -- transitions ------------------------------------------------------
    def apply(self, stats, momentum, scale=None):
        """The state after one EMA step on a batch's statistics.

        With a ``scale`` (a full step of ``fit``), the statistics are first
        multiplied by it, to express them per ``batch_size`` rows.
        """
        counts, sums = stats.counts, stats.sums
        distortions = stats.distortions
        scaled = scale is not None and scale != 1.0
        if scaled:
            counts, sums, distortions = (
                counts * scale,
                sums * scale,
                distortions * scale,
            )
        new_counts, new_sums, new_codes = ema_update(
            self.counts,
            self.sums,
            self.codes,
            counts,
            sums,
            momentum,
            batch_is_temporary=scaled,  # the scaled sums are this step's own
        )
        return replace(
            self,
            codes=new_codes,
            counts=new_counts,
            sums=new_sums,
            distortions=ema_average(self.distortions, distortions, momentum),
            n_steps=self.n_steps + 1,
            dead=np.zeros(self.n_codes, dtype=bool),
            batch_loss=stats.mean_loss,
        )

    def reseeded(self, codes, vectors, restart_count, dead):
        """The state with ``codes`` moved to ``vectors``, restarting as
        average codes (count ``restart_count``, sum count times vector,
        distortion 0); ``dead`` records the step's dead codes."""
        # Copies in the arrays' own layout (see ema_update).
        new_codes, counts = self.codes.copy(order="K"), self.counts.copy()
        sums, distortions = self.sums.copy(order="K"), self.distortions.copy()
        new_codes[codes] = vectors
        counts[codes] = restart_count
        sums[codes] = restart_count * new_codes[codes].astype(np.float64)
        distortions[codes] = 0.0
        return replace(
            self,
            codes=new_codes,
            counts=counts,
            sums=sums,
            distortions=distortions,
            n_reseeded=self.n_reseeded + codes.shape[0],
            dead=dead,
        )

    def marked_dead(self, dead):
        """The same code book, with ``dead`` recorded as the step's dead codes."""
        return replace(self, dead=dead)

    def relocated(self, moves, *, count=True):
        """The state after relocation ``moves`` (see
        :func:`~skvq._relocation.apply_relocations`); ``count`` adds them to
        ``n_relocated``."""
        if not moves:
            return self
        codes, counts, sums, distortions = apply_relocations(
            (self.codes, self.counts, self.sums, self.distortions), moves
        )
        return replace(
            self,
            codes=codes,
            counts=counts,
            sums=sums,
            distortions=distortions,
            n_relocated=self.n_relocated + (len(moves) if count else 0),
        )

    def counted_relocations(self, n_moves):
        """The same state with ``n_moves`` more relocations counted."""
        return replace(self, n_relocated=self.n_relocated + n_moves)

    def stepped_to(self, n_steps):
        """The same code book with its step counter set to ``n_steps`` (undo
        keeps counting steps)."""
        return replace(self, n_steps=n_steps)

    def installed(self, codes, counts, distortions):
        """A state with given code vectors and fit-style statistics: sums
        are counts times vectors, counts never below the floor."""
        counts = np.maximum(counts, COUNT_FLOOR)
        return replace(
            self,
            codes=codes,
            counts=counts,
            sums=counts[:, None] * codes.astype(np.float64),
            distortions=distortions,
        )

    def with_codes(self, codes):
        """The same statistics for new code vectors (sums follow the codes)."""
        return self.installed(codes, self.counts, self.distortions)

    # -- views in the data's units ------------------------------------------
    @property
    def codebook(self):
        """The code vectors in the data's units and dtype."""
        return _in_units(self.codes, self.unit)

    @property
    def ema_sum(self):
        """The EMA sums in the data's units (float64)."""
        return _in_units(self.sums, self.unit)

    @property
    def ema_distortion(self):
        """The EMA distortions in the data's units squared (float64)."""
        return _in_units(_in_units(self.distortions, self.unit), self.unit)

    @property
    def commitment_distortion(self):
        """The last batch's mean squared distance in the data's units squared."""
        return float(
            _in_units(_in_units(np.float64(self.batch_loss), self.unit), self.unit)
        )


def _in_units(values, unit):
    """``values * unit`` (exact, or infinite beyond the dtype's range)."""
    if unit == 1.0:
        return values
    with np.errstate(over="ignore", under="ignore"):
        return (values.astype(np.float64) * unit).astype(values.dtype)


class CodebookView:
    """One code book's fitted attributes, named as
    :class:`~skvq.VQCodebookTransformer` names them (a read-only view of a
    :class:`CodebookState`; the multi-codebook estimators' ``quantizers_``).
    """

    def __init__(self, state):
        self._state = state

    def __repr__(self):
        return f"CodebookView(n_codes={self._state.n_codes})"

    @property
    def codebook_(self):
        return self._state.codebook

    @property
    def ema_counts_(self):
        return self._state.counts

    @property
    def ema_sum_(self):
        return self._state.ema_sum

    @property
    def ema_distortion_(self):
        return self._state.ema_distortion

    @property
    def n_steps_(self):
        return self._state.n_steps

    @property
    def n_codes_reassigned_(self):
        return self._state.n_reseeded

    @property
    def n_codes_relocated_(self):
        return self._state.n_relocated

    @property
    def dead_codes_(self):
        return self._state.dead

    @property
    def perplexity_(self):
        return self._state.perplexity
