"""How a code book is trained: the fit schedule and the stream step.

Both are written once, as generators that yield requests
(:mod:`skvq._sources`) and receive their results, so they never know whether
the rows are in memory or on a cluster.  :func:`drive` serves them: it
gathers the pending request of every schedule it runs and has the source
serve them together, so that the code books of a product quantiser train in
lockstep, one pass over the rows per step for all of them.

``fit`` (:class:`FitSchedule`):

1. initialise from a canonical sample of the first stage;
2. on each stage (growing prefixes of the rows), full steps (EMA steps at
   momentum 0: Lloyd iterations) until the stage settles, with distance
   bounds on large stages;
3. on the largest stage of at most ``RELOCATION_ROWS`` rows, once converged,
   relocation rounds, each kept only if the distortion drops;
4. on the last stage, the stopping rules of ``tol`` and
   ``max_no_improvement``; ``max_iter`` caps every step.

A stream step (:func:`stream_step`) is one EMA step at ``ema_momentum``,
then the re-seeding of dead codes and, every few steps, relocation.
"""

import inspect
import warnings
from dataclasses import dataclass

import numpy as np

from ._kernels import greedy_trials, init_codebook, reseed_dead_codes
from ._relocation import CellSplits, plan_relocations, split_rows, whole_cells
from ._sources import (
    BOUNDS_MIN_SCORES,
    CellRows,
    InitSample,
    ReseedPool,
    Statistics,
    Variance,
)
from ._state import MAX_INIT_ROWS, CodebookState, SearchedBy

# Smallest relative decrease of the distortion that counts as improvement.
IMPROVEMENT_RTOL = 1e-9
# Each stage but the last (and the relocation stage) makes at most this
# many steps (docs/performance.rst).
STAGE_STEPS = 6
# Relocation (docs/health.rst): at most one code in this many moves in the
# first relocation round of fit.
FIT_MOVES_DIVISOR = 8
# A stream's split must gain this many times the cost of its merge: the gain
# is estimated on one batch, the cost known from the EMA statistics, and a
# margin stops codes from flapping between cells of nearly equal worth.
STREAM_MIN_RATIO = 1.5
# A stream considers relocation this many times per memory (1 / (1 - m)).
STREAM_CHECK_SHARE = 0.05
# ... and weighs splitting its this many cells of largest EMA distortion.
STREAM_CELLS = 2
# Relocation rounds of fit: moves certain to lower the distortion (exact
# gains and costs, see plan_relocations) are made without trial.  Once none
# is left, rounds of at most TRIAL_MOVES moves planned from cross-fitted
# gains are tried: such a round is kept if the distortion has dropped below
# the converged one within PROBE_STEPS steps, else undone; trials end after
# MAX_UNDONE undone single moves.  Measured on load_digits and china.jpg
# (docs/health.rst): two moves and two steps keep the distortion of the
# earlier four-step trials of up to n_codes / 8 moves (within 0.15 %) in about
# half the steps; a second undone single move changed one fit in ten.
TRIAL_MOVES = 2
PROBE_STEPS = 2
MAX_UNDONE = 1
# Rounds end after a kept round that lowered the distortion by less than this
# fraction.
MIN_ROUND_GAIN = 1e-4
# fit relocates on its largest stage of at most this many rows (or its first).
RELOCATION_ROWS = 2**16


def drive(source, schedules):
    """Run generator ``schedules`` against ``source``; return their results.

    Each round, the pending requests of all unfinished schedules are served
    together (one pass over the rows for all of them).
    """
    results = [None] * len(schedules)
    pending = {}
    for i, schedule in enumerate(schedules):
        _advance(schedule, None, i, pending, results, first=True)
    while pending:
        ids = list(pending)
        answers = source.serve([pending[i] for i in ids])
        for i, answer in zip(ids, answers, strict=True):
            _advance(schedules[i], answer, i, pending, results)
        # Answers can be as large as a code book (a step's sums): none stays
        # alive while the next round is served.
        del answers, answer
    return results


def _advance(schedule, answer, i, pending, results, first=False):
    try:
        pending[i] = next(schedule) if first else schedule.send(answer)
    except StopIteration as stop:
        pending.pop(i, None)
        results[i] = stop.value


def run(source, schedule):
    """:func:`drive` for one schedule."""
    return drive(source, [schedule])[0]


# ------------------------------------------------------------ shared pieces
def initial_state(config, source, key, stage, max_rows, rng):
    """A new code book from ``config.init``: an array, or drawn from a
    canonical sample of at most ``max_rows`` rows of ``stage`` (a generator).

    The draws come from ``rng``, then the seed of the re-seeding draws.
    """
    if isinstance(config.init, str):
        sample = yield InitSample(key, stage, max_rows)
        warn_if_few_rows(sample.n_rows, config.n_codes)
        codes = init_codebook(
            sample,
            config.n_codes,
            config.init,
            rng,
            n_trials=greedy_trials(config.n_codes),
        )
    else:
        codes = config.init / source.unit
    seed = int(rng.randint(np.iinfo(np.int32).max))
    return CodebookState.initial(
        codes.astype(source.dtype),
        algorithm=config.algorithm,
        seed=seed,
        unit=source.unit,
    )


def warn_if_few_rows(n_rows, n_codes):
    """Warn that a code book initialised from ``n_rows`` distinct rows
    repeats some of them, at the user's call (the depth of the schedules
    between varies)."""
    if n_rows < n_codes:
        warnings.warn(
            f"Only {n_rows} distinct samples of positive weight were "
            f"available to initialise n_codes={n_codes} codes; the code "
            "book repeats some of them.",
            UserWarning,
            stacklevel=_user_stacklevel(),
        )


def _user_stacklevel():
    """The ``stacklevel`` (for a warning raised by this function's caller)
    of the first frame outside skvq and scikit-learn."""
    frame, level = inspect.currentframe().f_back, 1
    while frame is not None and _library_frame(frame):
        frame, level = frame.f_back, level + 1
    return level


def _library_frame(frame):
    package = frame.f_globals.get("__name__", "").partition(".")[0]
    return package in ("skvq", "sklearn")


def dead_codes(state, searched, config, batch_counts=None):
    """The dead codes of ``state`` after a step searched with ``searched``.

    A code is dead when its count is below ``dead_code_threshold`` times the
    mean count (the EMA weight per code of a batch), or when it repeats a
    lower code; in a full step (``batch_counts`` given) only if its cell is
    empty too: on all the data, a small count is a small cell, not a code
    that stopped winning.

    Returns
    -------
    dead : ndarray of bool
    mean_count : float
        The count a re-seeded code restarts with (an average code: unless it
        wins, it is dead again only after ``log(threshold) / log(m)`` steps,
        whatever the batch size).
    """
    # The sum divided by the number of codes: the numbers of ``mean``,
    # without its Python layer (4 us of a stream step of a few hundred).
    mean_count = float(state.counts.sum()) / state.n_codes
    limit = config.dead_code_threshold * mean_count
    dead = state.counts < limit
    ids = searched.index.ids
    if limit > 0 and ids is not None:
        # A copy of a lower code can never win: it is dead whatever its count.
        copies = np.ones(state.n_codes, dtype=bool)
        copies[ids] = False
        dead |= copies
    if batch_counts is not None:
        dead &= batch_counts == 0
    return dead, mean_count


def reseed(state, dead, mean_count, pool):
    """``state`` with its dead codes re-seeded from ``pool`` (k-means++)."""
    if not dead.any():
        return state  # apply() recorded no dead code
    if pool is None:
        return state.marked_dead(dead)
    rng = np.random.default_rng([state.seed, state.n_steps - 1])
    codes, vectors = reseed_dead_codes(state.codes, dead, pool, rng)
    return state.reseeded(codes, vectors, mean_count, dead)


def full_update(config, state, stats, key, stage, scale):
    """The state after a full step (momentum 0) of ``state`` on all the rows
    of ``stage`` (a generator: dead codes, those whose cell is empty, are
    re-seeded from a canonical sample of the stage)."""
    new = state.apply(stats, 0.0, scale)
    dead, mean_count = dead_codes(new, state, config, stats.counts)
    pool = None
    if dead.any():
        pool = yield ReseedPool.of(state, key, stage, config.init_rows)
    return reseed(new, dead, mean_count, pool)


# ---------------------------------------------------------------- streams
def split_candidates(state, config):
    """Cells a stream's step may split: the largest EMA distortions.

    Relocation is considered every ``STREAM_CHECK_SHARE / (1 - m)`` steps
    (every 5 at the default momentum 0.99): the EMA statistics it weighs
    change on the scale of ``1 / (1 - m)`` steps, and a check costs a few
    2-means fits.  The codes that may move are the ``4 * STREAM_CELLS`` live
    codes of smallest EMA distortion.
    """
    if not config.relocate:
        return ()
    period = max(1, round(STREAM_CHECK_SHARE / (1.0 - config.ema_momentum)))
    if (state.n_steps + 1) % period:
        return ()
    n_cells = min(STREAM_CELLS, state.n_codes)
    distortion = state.distortions
    cells = np.argsort(-distortion, kind="stable")[:n_cells]
    return tuple(int(c) for c in cells[distortion[cells] > 0])


def stream_step(config, state, key=0, momentum=None):
    """One EMA step of ``state`` on the source's rows, then its upkeep
    (a generator returning the new state).

    ``momentum`` defaults to ``ema_momentum``.  Dead codes are re-seeded
    from a canonical sample of the batch; every few steps, the code whose
    merge costs least moves into the candidate cell whose split gains more
    than ``STREAM_MIN_RATIO`` times that cost.
    """
    result = yield Statistics.of(
        state, key, None, cells=split_candidates(state, config)
    )
    return (yield from stream_update(config, state, result, key, momentum))


def stream_update(config, state, result, key=0, momentum=None):
    """The upkeep half of :func:`stream_step`, from the step's
    :class:`~skvq._sources.StepResult` (a generator returning the new state).

    It is :func:`stream_apply`, then (when codes died) a
    :class:`~skvq._sources.ReseedPool` of ``key``'s rows, then
    :func:`stream_finish`; the residual quantiser runs the same pieces for
    all its stages with one request for their pools.
    """
    new, dead, mean_count = stream_apply(config, state, result, momentum)
    pool = None
    if dead.any():
        pool = yield ReseedPool.of(state, key, None, config.init_rows)
    return stream_finish(config, new, dead, mean_count, pool, result)


def stream_apply(config, state, result, momentum=None):
    """The EMA step of a stream on a step's result; returns the new state,
    its dead codes and the count they would restart with."""
    if momentum is None:
        momentum = config.ema_momentum
    stats = result.stats
    if not stats.weight > 0:
        raise ValueError("Sample weights must contain at least one non-zero number.")
    new = state.apply(stats, momentum)
    dead, mean_count = dead_codes(new, state, config)
    return new, dead, mean_count


def stream_finish(config, new, dead, mean_count, pool, result):
    """After :func:`stream_apply`: re-seed the dead codes from ``pool``, then
    relocate into the candidate cells of ``result`` whose split gains more
    than ``STREAM_MIN_RATIO`` times the merge cost."""
    new = reseed(new, dead, mean_count, pool)
    splits = split_rows(result.members or {}, result.stats.counts)
    if splits:
        by_distortion = np.argsort(new.distortions, kind="stable")
        movable = by_distortion[~dead[by_distortion]][: 4 * len(splits)]
        moves = plan_relocations(
            CellSplits(new.codes, splits),
            new.counts,
            movable,
            len(splits),
            STREAM_MIN_RATIO,
        )
        new = new.relocated(moves)
        if moves and config.verbose:
            print(
                f"Step {new.n_steps}: relocated codes "
                + ", ".join(f"{m.code} (into {m.split})" for m in moves)
            )
    return new


def start_stream(config, source, key, rng):
    """The first ``partial_fit``: initialise from the batch, then step
    (a generator returning the new state)."""
    state = yield from initial_state(config, source, key, None, config.init_rows, rng)
    return (yield from stream_step(config, state, key))


# -------------------------------------------------------------------- fit
@dataclass(frozen=True)
class Converged:
    """The last full step of a convergence: its per-code counts and
    distortions, what assigned the rows (a state's version and index, not
    its statistics: a fit keeps several of these, and with many features a
    state's sums are as large as its code book), the distortion before the
    step, and whether a stopping rule fired (rather than a step limit)."""

    counts: np.ndarray
    distortions: np.ndarray
    assigned_by: SearchedBy
    loss: float
    converged: bool


@dataclass(frozen=True)
class FitOutcome:
    """The trained state and the number of full steps ``fit`` made."""

    state: CodebookState
    n_iter: int


class EarlyStopping:
    """Early-stopping rule of ``fit``'s full steps, fed each one's loss and shift.

    ``loss`` is the distortion of the code book before the step, ``shift``
    the sum over codes of their squared movement in the step.
    """

    def __init__(self, config, mean_variance):
        self.max_no_improvement = config.max_no_improvement
        self.tol = config.tol * mean_variance
        self.best_loss = np.inf
        self.n_no_improvement = 0
        self.reason = ""

    def should_stop(self, loss, shift):
        if loss < self.best_loss * (1.0 - IMPROVEMENT_RTOL):
            self.best_loss = loss
            self.n_no_improvement = 0
        else:
            self.n_no_improvement += 1
        if self.tol > 0 and shift <= self.tol:
            self.reason = (
                "the assignments no longer change"
                if shift == 0
                else f"the code book moved less than tol ({shift:.3g})"
            )
        elif (
            self.max_no_improvement is not None
            and self.n_no_improvement >= self.max_no_improvement
        ):
            self.reason = f"no improvement in {self.n_no_improvement} passes"
        return bool(self.reason)


def training_sample(config, trainer, key):
    """The canonical sample of at most ``trainer.max_rows`` distinct rows
    that code book ``key``'s stage trainer (a
    :class:`~skvq._stage_trainer.StageTrainer`) fits: the first half of the
    ``fit`` of one code book of a multi-codebook quantiser (a generator;
    warns when the sample has fewer rows than codes)."""
    sample = yield InitSample(key, None, trainer.max_rows)
    warn_if_few_rows(sample.n_rows, config.n_codes)
    return sample


def settled_fit(config, source, fit, rng, key):
    """The second half, from the stage trainer's
    :class:`~skvq._stage_trainer.StageFit` of the sample: the state (its
    re-seeding seed drawn from ``rng``, after the trainer's draws), then one
    full step on all the rows, which sets its usage and keeps ``fit``'s
    invariant (every code is the mean of its cell).  A generator returning
    a :class:`FitOutcome`."""
    seed = int(rng.randint(np.iinfo(np.int32).max))
    state = CodebookState.initial(
        fit.codes, algorithm=config.algorithm, seed=seed, unit=source.unit
    )
    last = len(source.plan.rows) - 1
    result = yield Statistics.of(state, key, last)
    state = yield from full_update(
        config, state, result.stats, key, last, source.plan.scale(last)
    )
    return FitOutcome(state, fit.n_iter + 1)


class FitSchedule:
    """``fit`` of one code book on a source (see the module docstring).

    ``run()`` is the generator that :func:`drive` serves; it returns a
    :class:`FitOutcome`.  ``rng`` draws the initialisation and the seed of
    the re-seeding draws (after the source drew its row order).
    """

    def __init__(self, config, source, rng, key=0):
        self.config = config
        self.source = source
        self.plan = source.plan
        self.rng = rng
        self.key = key
        self.n_iter = 0
        self.variance = 0.0

    def run(self):
        config, plan = self.config, self.plan
        init_rows = max(config.init_rows, min(plan.rows[0], MAX_INIT_ROWS))
        state = yield from initial_state(
            config, self.source, self.key, 0, init_rows, self.rng
        )
        if config.tol > 0:
            self.variance = (yield Variance(self.key, None)).mean_variance
        relocation_stage = None
        if config.relocate:
            fits = [s for s, size in enumerate(plan.rows) if size <= RELOCATION_ROWS]
            relocation_stage = fits[-1] if fits else 0
        last_stage = len(plan.rows) - 1
        for stage, size in enumerate(plan.rows):
            if self.n_iter == config.max_iter:
                break
            settle = stage in (last_stage, relocation_stage)
            tol = None
            if not settle:
                tol = self.variance * config.tol * plan.n_rows / size
            state, last = yield from self.converge(
                state,
                stage,
                f"stage {stage + 1}, {size} rows",
                None if settle else STAGE_STEPS,
                tol,
            )
            if stage == relocation_stage and last is not None and last.converged:
                rounds = self.relocation_rounds(state, stage, last)
                # The rounds hold what they need of these (with many features,
                # each code book is large): this frame keeps no older one.
                del state, last
                state = yield from rounds
        return FitOutcome(state, self.n_iter)

    def full_step(self, state, stage):
        """One full step (momentum 0) on ``stage``; returns the statistics and
        the new state (a generator)."""
        config = self.config
        uses_bounds = self.plan.rows[stage] * config.n_codes >= BOUNDS_MIN_SCORES
        result = yield Statistics.of(state, self.key, stage, bounds=uses_bounds)
        new = yield from full_update(
            config, state, result.stats, self.key, stage, self.plan.scale(stage)
        )
        return result.stats, new

    def converge(self, state, stage, label, limit=None, tol=None):
        """Full steps until a stopping rule fires, or ``limit`` steps.

        The rule is the stage rule (shift at most ``tol``) when ``tol`` is
        given, else :class:`EarlyStopping`.  Returns the new state and the
        last step's :class:`Converged` (None if no step was left).
        """
        config = self.config
        stopper = EarlyStopping(config, self.variance)
        last = None
        for n_steps in range(1, config.max_iter - self.n_iter + 1):
            start = state
            stats, state = yield from self.full_step(state, stage)
            self.n_iter += 1
            # The step's sums (as large as the code book) are not kept.
            loss, counts, distortions = stats.mean_loss, stats.counts, stats.distortions
            del stats
            moved = (state.codes - start.codes).astype(np.float64, copy=False)
            shift = float(np.sum(np.square(moved, out=moved)))
            if config.verbose:
                print(
                    f"Step {self.n_iter} ({label}): distortion "
                    f"{loss * state.unit * state.unit:.6g}, perplexity "
                    f"{state.perplexity:.4g}, "
                    f"{state.n_reseeded - start.n_reseeded} codes reassigned"
                )
            converged = (
                shift <= tol if tol is not None else stopper.should_stop(loss, shift)
            )
            if converged and tol is None and config.verbose:
                print(f"Converged after step {self.n_iter}: {stopper.reason}.")
            last = Converged(counts, distortions, start.searched_by(), loss, converged)
            if converged or n_steps == limit:
                break
        return state, last

    def relocation_rounds(self, state, stage, last):
        """Relocate codes after convergence while that lowers the distortion.

        Each round plans moves from the last step's cells (the cheapest
        codes to merge into the cells with the largest split gain, see
        :func:`~skvq._relocation.plan_relocations`).  Moves whose gain
        certainly exceeds their cost (cells whose rows are all known: exact
        gains and costs) are made and run to convergence, with no trial.
        When none is certain, a trial of at most ``TRIAL_MOVES`` moves
        (gains cross-fitted) makes up to ``PROBE_STEPS`` full steps; a trial
        whose distortion has not dropped below the converged one by then is
        undone, and the next tries half as many moves (after a single move,
        another code and another cell); a kept trial runs to convergence.
        The rounds end when no move is worth trying, after ``MAX_UNDONE``
        undone single moves, after a kept round that gained less than
        ``MIN_ROUND_GAIN``, or at half of ``max_iter``.
        """
        config = self.config
        max_moves = max(1, config.n_codes // FIT_MOVES_DIVISOR)
        counts, distortions = last.counts, last.distortions
        assigned_by, best = last.assigned_by, last.loss
        del last  # its search index holds a code book that rounds may replace
        movable = np.ones(config.n_codes, dtype=bool)
        splittable = np.ones(config.n_codes, dtype=bool)
        n_undone = 0
        budget = config.max_iter // 2  # leave steps for the stages that follow
        while self.n_iter < budget and n_undone < MAX_UNDONE:
            cells = np.argsort(-distortions, kind="stable")
            cells = cells[splittable[cells]][: 2 * max_moves]
            members = yield CellRows.of(assigned_by, self.key, stage, cells)
            # Both plans below weigh the same cells: their splits are fitted once.
            candidates = CellSplits(state.codes, split_rows(members, counts))
            moves = plan_relocations(
                candidates,
                counts,
                np.flatnonzero(movable),
                max_moves,
                0.0,
                whole=whole_cells(members),
            )
            if not moves:  # no certain move: a trial
                max_moves = min(max_moves, TRIAL_MOVES)
                moves = plan_relocations(
                    candidates, counts, np.flatnonzero(movable), max_moves, 0.0
                )
            if not moves:
                break
            before = state
            certain = all(move.certain for move in moves)
            state, probe = yield from self.converge(
                state.relocated(moves, count=False),
                stage,
                "relocated",
                None if certain else PROBE_STEPS,
            )
            kept = probe.loss < best * (1.0 - IMPROVEMENT_RTOL)
            if config.verbose:
                unit2 = state.unit * state.unit
                print(
                    f"Relocated {len(moves)} codes{' (certain)' if certain else ''}: "
                    f"distortion {best * unit2:.6g} -> {probe.loss * unit2:.6g}, "
                    f"{'kept' if kept else 'undone'}."
                )
            if kept:
                state = state.counted_relocations(len(moves))
                if not probe.converged and self.n_iter < budget:
                    state, probe = yield from self.converge(state, stage, "relocated")
                counts, distortions = probe.counts, probe.distortions
                assigned_by, loss = probe.assigned_by, probe.loss
                if loss > best * (1.0 - MIN_ROUND_GAIN):
                    break
                best = loss
                continue
            state = before.stepped_to(state.n_steps)
            if len(moves) == 1:
                movable[moves[0].code] = splittable[moves[0].split] = False
                n_undone += 1
            max_moves = max(1, len(moves) // 2)
        return state
