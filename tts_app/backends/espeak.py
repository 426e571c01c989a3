"""Real speech from libespeak-ng (shipped in PyPI ``espeakng-loader``), loaded with ctypes.

libespeak-ng keeps all its state in process globals and is not thread-safe, so one loaded
copy of the library is one instance, lent to one request at a time. To run ``instances``
syntheses in parallel, extra instances load private copies of the shared object (a distinct
file path gives the dynamic loader a distinct handle with its own globals). ctypes releases the GIL
during the call, so instances really run in parallel on separate cores. A retired instance
(its synthesis hung) is replaced by another private copy, never by a reload of the same path.
"""

from __future__ import annotations

import ctypes
import itertools
import re
import shutil
import tempfile
import time
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from tts_app.backends.base import StageCallback, SynthesisRequest
from tts_app.backends.pool import InstancePool
from tts_app.errors import SynthesisError

AUDIO_OUTPUT_SYNCHRONOUS = 2
POS_CHARACTER = 1
ESPEAK_CHARS_UTF8 = 1
ESPEAK_RATE = 1
DEFAULT_RATE_WPM = 175

# voice name -> espeak-ng voice; "default" follows the request's language.
VOICES: dict[str, str] = {"en-us": "en-us", "en-gb": "en", "cmn": "cmn", "zh": "cmn"}
LANG_DEFAULT_VOICE = {"en": "en-us", "zh": "cmn"}

_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                                   ctypes.c_void_p)
_SENTENCE_END = re.compile(r"(?<=[.!?。！？；;])\s*")


class _Instance:
    """One loaded copy of libespeak-ng; callers hold ``lock`` implicitly via the pool."""

    def __init__(self, library_path: str, data_path: str) -> None:
        self.lib = ctypes.CDLL(library_path, mode=ctypes.RTLD_LOCAL)
        self.lib.espeak_Initialize.restype = ctypes.c_int
        self.lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p,
                                               ctypes.c_int]
        self.lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        self.lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        self.lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint,
                                          ctypes.c_int, ctypes.c_uint, ctypes.c_uint,
                                          ctypes.c_void_p, ctypes.c_void_p]
        rate = self.lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0,
                                          data_path.encode(), 0)
        if rate <= 0:
            raise SynthesisError("MODEL_ERROR", f"espeak_Initialize failed ({rate})",
                                 stage="load")
        self.sample_rate = rate
        self.lib.espeak_Info.restype = ctypes.c_char_p
        self.lib.espeak_Info.argtypes = [ctypes.c_void_p]
        self.version = (self.lib.espeak_Info(None) or b"unknown").decode("ascii", "replace")
        self._pieces: list[np.ndarray] = []
        # Keep a reference: ctypes frees the trampoline when the Python object dies.
        self._callback = _SYNTH_CALLBACK(self._on_audio)
        self.lib.espeak_SetSynthCallback(self._callback)
        self._voice = ""

    def _on_audio(self, wav: ctypes._Pointer, count: int, _events: int) -> int:
        if count > 0 and wav:
            self._pieces.append(np.ctypeslib.as_array(wav, shape=(count,)).copy())
        return 0

    def synth(self, text: str, voice: str, rate_wpm: int) -> np.ndarray:
        """Synthesize ``text`` completely; returns int16 samples."""
        if voice != self._voice:
            if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise SynthesisError("MODEL_ERROR", f"espeak voice {voice!r} failed to load",
                                     stage="synthesis")
            self._voice = voice
        self.lib.espeak_SetParameter(ESPEAK_RATE, rate_wpm, 0)
        data = text.encode("utf-8") + b"\0"
        self._pieces = []
        status = self.lib.espeak_Synth(data, len(data), 0, POS_CHARACTER, 0,
                                       ESPEAK_CHARS_UTF8, None, None)
        if status != 0:
            raise SynthesisError("MODEL_ERROR", f"espeak_Synth returned {status}",
                                 stage="synthesis")
        pieces, self._pieces = self._pieces, []
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int16)


class EspeakBackend:
    """The embedded default backend: English and Mandarin voices at 22 050 Hz."""

    name = "espeak"

    def __init__(self, instances: int = 1, rate_wpm: int = DEFAULT_RATE_WPM,
                 library_path: str | None = None, data_path: str | None = None) -> None:
        if instances < 1:
            raise ValueError("instances must be >= 1")
        self.instances = instances
        self.rate_wpm = rate_wpm
        self._library_path = library_path
        self._data_path = data_path
        self.sample_rate = 22050
        self.voices = frozenset(("default", *VOICES))
        self.languages = frozenset(LANG_DEFAULT_VOICE)
        self.model_version = "espeak-ng"
        self._pool: InstancePool[_Instance] = InstancePool(
            lambda instance: instance.lib.espeak_Terminate())
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None
        self._copies = itertools.count()
        self._library = self._data = ""

    def load(self) -> None:
        import espeakng_loader

        library = self._library_path or espeakng_loader.get_library_path()
        data = self._data_path or espeakng_loader.get_data_path()
        # libespeak-ng calls exit() when its data is missing: check before it can.
        if not (Path(data) / "phontab").is_file():
            raise SynthesisError("MODEL_NOT_READY", f"no espeak-ng data (phontab) in {data}",
                                 stage="load")
        if not Path(library).is_file():
            raise SynthesisError("MODEL_NOT_READY", f"no libespeak-ng at {library}",
                                 stage="load")
        self._library, self._data = library, data
        instance = self._load(library)
        for _ in range(self.instances - 1):
            self.rebuild()
        self.model_version = f"espeak-ng-{instance.version}/{self.rate_wpm}wpm"

    def _load(self, path: str) -> _Instance:
        instance = _Instance(path, self._data)
        self.sample_rate = instance.sample_rate
        self._pool.put(instance)
        return instance

    def rebuild(self) -> None:
        """One more instance from a private copy of the library (its own globals)."""
        if self._tmpdir is None:
            self._tmpdir = tempfile.TemporaryDirectory(prefix="tts-espeak-")
        path = str(Path(self._tmpdir.name) / f"libespeak-ng-{next(self._copies)}.so")
        shutil.copyfile(self._library, path)
        self._load(path)

    def retire(self, request: SynthesisRequest) -> bool:
        return self._pool.retire(request)

    def synthesize(self, request: SynthesisRequest, on_stage: StageCallback
                   ) -> Iterator[np.ndarray]:
        start = time.perf_counter()
        text = unicodedata.normalize("NFC", " ".join(request.text.split()))
        sentences = [s for s in _SENTENCE_END.split(text) if s.strip()] or [text]
        voice = VOICES.get(request.voice) or LANG_DEFAULT_VOICE.get(request.lang, "en-us")
        rate = max(80, min(450, round(self.rate_wpm * request.params.speed)))
        on_stage("text_normalize", (time.perf_counter() - start) * 1000)
        with self._pool.checkout(request) as instance:
            for sentence in sentences:
                t0 = time.perf_counter()
                samples = instance.synth(sentence, voice, rate)
                t1 = time.perf_counter()
                on_stage("synthesis", (t1 - t0) * 1000)
                chunk = samples.astype(np.float32) / 32768.0
                on_stage("audio_render", (time.perf_counter() - t1) * 1000)
                if chunk.size:
                    yield chunk

    def close(self) -> None:
        self._pool.close()
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None
