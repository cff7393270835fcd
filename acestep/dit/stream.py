"""A song handed on while the VAE decodes it, window by window, before the whole waveform exists.

The decode (``acestep.dit.vae.decode_batch``) reports each window's audio as it finishes, raw and
possibly out of order (windows of equal length from several songs go together), or twice (a decode
that failed is retried, maybe in smaller windows). ``SongStream`` keeps the samples it has handed on
and passes on only the next contiguous ones, post-processed as the stored file is (the repaint
splice, the clip guard, normalisation and the fades: ``acestep.dit.vae.postprocess``) with one
difference: the gain comes from the peak of the samples so far, since the song's peak is not known
yet. The stream never clips; it is quieter than the file until its loudest window arrives, where its
level steps down to the file's. Its length is the file's, sample for sample.
"""

from __future__ import annotations

import logging
from typing import Callable, Dict, Optional, Tuple

import torch

from acestep.audio import HOP
from acestep.dit import vae as vae_ops
from acestep.dit.items import DiTItem, PostProcess
from acestep.dit.tasks import splice_waveform

logger = logging.getLogger(__name__)

# (first sample, post-processed audio [2, n] on the CPU, the song's length in samples: it ends with
# this piece when first sample + n reaches it)
Emit = Callable[[int, torch.Tensor, int], None]


class SongStream:
    """One song's decoded windows → its post-processed audio in order, handed to ``emit``."""

    def __init__(self, total: int, post: PostProcess, emit: Emit,
                 splice: Optional[Tuple[torch.Tensor, Tuple[int, int], float]] = None):
        self.total, self.post, self.emit = int(total), post, emit
        self.done = 0  # samples handed on
        self.peak = 0.0
        self._ahead: Dict[int, torch.Tensor] = {}  # first sample → raw audio decoded past ``done``
        self._fade_in = min(vae_ops.fade_samples(post.fade_in_s), self.total)
        self._fade_out = min(vae_ops.fade_samples(post.fade_out_s), self.total)
        self._weight = self._source = None
        if splice is not None:
            source, samples, crossfade_s = splice
            # the splice's weight over the song: 1 keeps the generated audio, 0 the source
            ones = torch.ones(1, self.total)
            self._weight = splice_waveform(ones, torch.zeros(1, source.shape[-1]), samples, crossfade_s)[0]
            self._source = source.float().cpu()

    @classmethod
    def of(cls, item: DiTItem, frames: int, emit: Emit) -> "SongStream":
        """The stream of ``item`` rendered to ``frames`` latent frames."""
        repaint, splice = item.repaint, None
        if repaint is not None and repaint.config.splice and item.source_audio is not None:
            splice = (item.source_audio, repaint.samples, repaint.config.wav_crossfade_s)
        return cls(frames * HOP, item.post, emit, splice)

    @property
    def ended(self) -> bool:
        return self.done >= self.total

    def piece(self, start: int, audio: torch.Tensor) -> None:
        """Raw decoded samples ``[start, start + n)`` of the song; what follows ``done`` goes on."""
        if start + audio.shape[-1] <= self.done or self.ended:
            return
        self._ahead[start] = audio
        while not self.ended:
            found = next(((s, a) for s, a in self._ahead.items() if s <= self.done < s + a.shape[-1]), None)
            if found is None:
                break
            start, audio = found
            del self._ahead[start]
            self._hand_on(audio[..., self.done - start:])
        self._ahead = {s: a for s, a in self._ahead.items() if s + a.shape[-1] > self.done}

    def _hand_on(self, audio: torch.Tensor) -> None:
        start = self.done
        audio = self._shape(start, audio[..., :self.total - start].float().cpu())
        self.done += audio.shape[-1]
        try:
            self.emit(start, audio, self.total)
        except Exception:  # a stream's consumer must never stop the batch
            logger.exception("song stream consumer failed")

    def _shape(self, start: int, audio: torch.Tensor) -> torch.Tensor:
        end = start + audio.shape[-1]
        if self._weight is not None:
            length = min(end, self._source.shape[-1]) - start
            if length > 0:
                weight, source = self._weight[start:start + length], self._source[..., start:start + length]
                audio = audio.clone()
                audio[..., :length] = weight * audio[..., :length] + (1 - weight) * source
        self.peak = max(self.peak, float(audio.abs().amax()))
        audio = audio * self._gain()
        return self._fades(start, audio)

    def _gain(self) -> float:
        """``postprocess``'s gain had the song's peak been the peak so far: the clip guard divides by
        a peak above 1, normalisation brings the peak to its target unless it is near-silence."""
        if self.post.normalize and self.peak >= vae_ops.SILENT_PEAK:
            return 10 ** (self.post.normalization_db / 20) / self.peak
        return 1.0 / max(self.peak, 1.0)

    def _fades(self, start: int, audio: torch.Tensor) -> torch.Tensor:
        end = start + audio.shape[-1]
        if start < self._fade_in:
            ramp = torch.linspace(0.0, 1.0, self._fade_in)[start:min(end, self._fade_in)]
            audio[..., :ramp.shape[0]] *= ramp
        fade_from = self.total - self._fade_out
        if self._fade_out and end > fade_from:
            ramp = torch.linspace(1.0, 0.0, self._fade_out)[max(start - fade_from, 0):end - fade_from]
            audio[..., audio.shape[-1] - ramp.shape[0]:] *= ramp
        return audio
