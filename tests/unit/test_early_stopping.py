from train.loop import Progress, should_stop, track


def run(accuracies: list[float], patience: int | None) -> int:
    """Epochs trained before early stopping (or all of them)."""
    progress = Progress()
    for epoch, acc in enumerate(accuracies):
        track(progress, {"epoch": epoch, "val_accuracy": acc})
        if should_stop(progress, patience):
            return epoch + 1
    return len(accuracies)


def test_stops_after_patience_epochs_without_improvement() -> None:
    assert run([0.5, 0.6, 0.7, 0.7, 0.69, 0.71, 0.72], patience=2) == 5
    assert run([0.5, 0.6, 0.7, 0.7, 0.69, 0.71, 0.72], patience=3) == 7


def test_no_patience_never_stops() -> None:
    assert run([0.9, 0.1, 0.1, 0.1], patience=None) == 4


def test_progress_remembers_the_best_and_the_next_epoch() -> None:
    progress = Progress()
    for epoch, acc in enumerate([0.5, 0.8, 0.7]):
        carried = track(progress, {"epoch": epoch, "val_accuracy": acc})
    assert (progress.next_epoch, progress.best_val_accuracy) == (3, 0.8)
    assert carried == {"best_val_accuracy": 0.8, "resumed_from_step": -1}
