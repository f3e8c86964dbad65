"""The subject is the person who speaks: among the face tracks that behave like people
(``pipelines.faces.person_tracks``), the one whose mouth opening follows the audio. numpy only.

Per track, over the frames ``[start, stop)`` of one shot (the whole video until shots are cut
apart), the evaluation's ``sync`` (:func:`pipelines.faces.mouth_sync.sync_score`: the best
Pearson correlation, within +-``max_lag`` frames, of the inner-lip gap / face width with the
loudness per frame) is measured. The speaker is the track with the highest sync when it
reaches ``min_sync`` and leads every other person by ``margin``; otherwise no track speaks clearly
more than the others, and the caller rejects the shot with the figures
(:attr:`SpeakerChoice.why`). One person alone is the subject whatever its sync (its figure is
still reported): the tests of ``person_tracks`` already say its mouth moves.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from pipelines.faces.mouth_sync import mouth_opening, sync_score


@dataclass(frozen=True)
class SpeakerParams:
    """``min_sync``: the speaker's sync at least; ``margin``: its lead over the next person;
    ``max_lag``: frames of the sync's lag search (as the evaluation's)."""

    min_sync: float = 0.3
    margin: float = 0.2
    max_lag: int = 2


@dataclass(frozen=True)
class SpeakerChoice:
    """``speaker``: index into the candidates given (None: nobody speaks clearly), ``syncs`` the
    sync of each (NaN: too few frames), ``why`` the reason when there is no speaker."""

    speaker: Optional[int]
    syncs: tuple[float, ...]
    why: str = ""


def track_sync(landmarks: np.ndarray, loudness: np.ndarray, start: int = 0, stop: Optional[int] = None,
               max_lag: int = SpeakerParams.max_lag) -> float:
    """Sync of one track's landmarks [N, 68, 2] (NaN rows where unseen) with ``loudness`` [N]
    (:func:`pipelines.faces.mouth_sync.audio_loudness_per_frame`) over frames ``[start, stop)``."""
    stop = len(loudness) if stop is None else stop
    return sync_score(mouth_opening(np.asarray(landmarks)[start:stop]), np.asarray(loudness)[start:stop], max_lag)


def choose_speaker(landmarks: list[np.ndarray], loudness: np.ndarray, start: int = 0, stop: Optional[int] = None,
                   params: SpeakerParams = SpeakerParams()) -> SpeakerChoice:
    """The person (index into ``landmarks``, one [N, 68, 2] array per person track) whose mouth
    follows ``loudness`` [N] over frames ``[start, stop)`` (see the module docstring)."""
    syncs = tuple(track_sync(lm, loudness, start, stop, params.max_lag) for lm in landmarks)
    if not syncs:
        return SpeakerChoice(None, syncs, "no person")
    if len(syncs) == 1:
        return SpeakerChoice(0, syncs)
    score = np.nan_to_num(np.asarray(syncs, np.float64), nan=-1.0)
    order = np.argsort(-score, kind="stable")
    best, second = score[order[0]], score[order[1]]
    if best >= params.min_sync and best - second >= params.margin:
        return SpeakerChoice(int(order[0]), syncs)
    figures = ", ".join(f"{s:.2f}" for s in sorted(score, reverse=True))
    return SpeakerChoice(None, syncs, f"no one of {len(syncs)} people speaks clearly more than the others "
                                      f"(mouth-audio sync {figures}; the speaker needs >= {params.min_sync:g} "
                                      f"and a lead of {params.margin:g})")
