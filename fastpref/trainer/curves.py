"""What a finished ``train`` leaves at the top of ``output_dir``: ``trainer_state.json`` (the trainer state with its
log history, kept even when no checkpoint is saved) and ``training_curves.png`` (loss, reward accuracy and reward
margin over steps, train and eval; skipped with one info line when matplotlib is absent)."""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
CURVES_FILE = "training_curves.png"
# (train key, eval key, panel title)
PANELS = (("loss", "eval_loss", "loss"),
          ("rewards/accuracies", "eval_rewards/accuracies", "reward accuracy"),
          ("rewards/margins", "eval_rewards/margins", "reward margin"))


def write_training_record(state, output_dir: str) -> None:
    """``state`` (a transformers ``TrainerState``) as ``output_dir/trainer_state.json`` and its curves as
    ``output_dir/training_curves.png``."""
    os.makedirs(output_dir, exist_ok=True)
    state.save_to_json(os.path.join(output_dir, STATE_FILE))
    try:
        import matplotlib
    except ImportError:
        logger.info(f"training curves: matplotlib is not installed, {CURVES_FILE} skipped")
        return
    matplotlib.use("Agg")
    _plot(state.log_history, os.path.join(output_dir, CURVES_FILE))
    logger.info(f"training record: {STATE_FILE} and {CURVES_FILE} in {output_dir}")


def _series(history: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(entry["step"], entry[key]) for entry in history if key in entry and "step" in entry]
    return [step for step, _ in points], [value for _, value in points]


def _plot(history: list[dict], path: str) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 3.6), dpi=100, layout="constrained")
    for axes, (train_key, eval_key, title) in zip(figure.subplots(1, len(PANELS)), PANELS):
        for key, label, marker in ((train_key, "train", None), (eval_key, "eval", "o")):
            steps, values = _series(history, key)
            if steps:
                axes.plot(steps, values, label=label, marker=marker)
        axes.set_title(title)
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
        if axes.has_data():
            axes.legend()
    figure.savefig(path)
