"""The worker process's collector settings (`crdtchat.worker.main.tune_gc`)."""

from __future__ import annotations

import gc

from crdtchat.worker.main import YOUNG_COLLECTION_THRESHOLD, tune_gc


def test_tune_gc_freezes_start_up_and_collects_the_young_generation_less_often() -> None:
    before = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_freeze_count() > 0  # start-up's objects: no collection traverses them
        assert gc.get_threshold() == (YOUNG_COLLECTION_THRESHOLD, before[1], before[2])
        assert before[0] < YOUNG_COLLECTION_THRESHOLD
        tune_gc()  # idempotent: a second call does not raise the threshold again
        assert gc.get_threshold()[0] == YOUNG_COLLECTION_THRESHOLD
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
