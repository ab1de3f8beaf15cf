"""What the learning-rate schedule of a resumed run is when ``train.steps`` changed.

The schedule is warmup-stable-decay over ``total`` steps (``reference.schedule.wsd_lr``). A run
is resumed with the step count of its checkpoint, so ``N`` steps in one go and ``N/2 + N/2`` are
the same run. When ``--steps`` (or ``train.steps``) differs from the schedule the checkpoint was
trained under, the rule is:

- the checkpoint is still before that schedule's decay (warmup or the stable phase): the schedule
  simply becomes the new length, and the decay moves to the new end (no jump: before the decay,
  every length gives the same rate);
- the decay had begun (or the run had finished): the schedule stays the one it was trained
  under. The rate continues that decay to its end and then stays at its final value
  (``min_lr_ratio`` times each base rate) for every further step; it never warms up or rises
  again. A shorter run stops partway down the same decay.

The schedule length a run uses is written to each checkpoint (``state.json``: ``schedule_steps``),
so extending an extended run keeps the first schedule. Checkpoints written before that field
existed use their config's ``train.steps``.
"""
from __future__ import annotations


def decay_start(total, decay_frac):
    """First step (0-based) of the decay of a ``total``-step schedule, as ``wsd_lr`` computes it."""
    return total - int(round(decay_frac * total))


def resumed_schedule(step, trained_total, new_total, optim):
    """``(schedule_steps, note)`` for a run resumed at ``step`` (optimizer updates applied).

    ``trained_total`` is the schedule length the checkpoint was trained under, ``new_total`` the
    resumed run's ``train.steps``, ``optim`` its ``OptimConfig``. ``note`` is None when nothing
    changed, else one sentence for the screen saying what the learning rate will do.
    """
    if new_total == trained_total or new_total <= step:
        return trained_total, None  # the same run, or nothing left to train
    start = decay_start(trained_total, optim.decay_frac)
    if step < start:
        new_start = decay_start(new_total, optim.decay_frac)
        return new_total, (
            f"schedule: train.steps changed from {trained_total} to {new_total} at step {step}, before the "
            f"learning-rate decay (due at step {start}), so the schedule now spans {new_total} steps and "
            f"decays from step {new_start}")
    if new_total > trained_total:
        return trained_total, (
            f"schedule: extending a run whose learning-rate decay had begun (at step {start} of its "
            f"{trained_total}-step schedule): the rate follows that schedule to step {trained_total} and then "
            f"stays at its final value ({optim.min_lr_ratio:g} x each base rate) for steps "
            f"{max(step, trained_total) + 1}-{new_total}; it does not warm up again")
    return trained_total, (
        f"schedule: stopping at step {new_total} inside the learning-rate decay of the {trained_total}-step "
        f"schedule the run was trained under, so the rate ends above its final value")


def trained_schedule_steps(state, config_toml, default):
    """The schedule length a checkpoint was trained under: ``state['schedule_steps']``, else its
    config's ``train.steps`` (checkpoints from before the field), else ``default``."""
    steps = state.get("schedule_steps")
    if isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1:
        return steps
    try:
        steps = _toml_loads(config_toml or "").get("train", {}).get("steps")
    except ValueError:  # the checkpoint's config is validated elsewhere; do not fail on it here
        steps = None
    return steps if isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1 else default


def _toml_loads(text):
    import sys

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    return tomllib.loads(text)
