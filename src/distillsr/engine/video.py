"""Video through the network with PyAV (FFmpeg): :func:`upscale_video` decodes a clip,
upscales its frames in batches with an :class:`~distillsr.engine.upscaler.Upscaler` and
encodes them as a stream (memory does not grow with the clip's length), and
:func:`upscale_videos` runs a list of clips into an output folder the way
``engine.batch`` runs images (same record of outputs, same skip rules, a bad clip is
reported and the rest go on).

What the output keeps: the container (its extension), the frame rate, the time base and
every frame's timestamp (variable frame rate included), the display matrix (rotation and
flips), the sample aspect ratio, the colour range, matrix, primaries and transfer where the
input states them, and the pixel format where the encoder takes it. Audio and subtitle
streams are copied packet by packet, never re-encoded. An output size that the pixel format's
chroma subsampling cannot hold (an odd size in 4:2:0, from x3 of an odd input) is refused
with a message naming the size and what would hold it; frames are never stretched.

Each frame goes through :meth:`Upscaler.upscale_array`, the path of images, so a frame of the
output equals the image upscale of the decoded input frame before encoding (with
``batch > 1`` and frames that fit in memory whole, ``batch`` frames share one network call,
which can move a few pixels by one level through float rounding).
"""
from __future__ import annotations

import os
import struct
import sys
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable, List, Optional, Tuple, Union

import numpy as np
import torch

from .. import io as imgio
from .upscaler import Upscaler

__all__ = ["VideoError", "VideoOptions", "VideoProbe", "VideoResult", "check_video_options", "is_video",
           "probe_video", "upscale_video", "upscale_videos", "video_output_path", "DEFAULT_CODEC", "DEFAULT_CRF"]

PathArg = Union[str, os.PathLike]

DEFAULT_CODEC = "libx264"
DEFAULT_CODECS = {"webm": "libvpx-vp9"}  # muxer -> encoder, where the default cannot go
DEFAULT_CRF = 18                          # for encoders with a crf setting; near transparent
INSTALL_HINT = "pip install distillsr[video]"


class VideoError(ValueError):
    """A video that cannot be read, or whose output cannot be written (the message names it)."""


def require_av():
    """The ``av`` module (PyAV), or a :class:`VideoError` saying how to install it."""
    try:
        import av
    except ImportError as e:
        raise VideoError(f"video needs PyAV, which is not installed: {INSTALL_HINT}") from e
    return av


def is_video(path: PathArg) -> bool:
    """Whether a file name is a video (``distillsr.io.VIDEO_EXTENSIONS``)."""
    return Path(path).suffix.lower() in imgio.VIDEO_EXTENSIONS


def video_output_path(rel: Path, out_dir: Path, suffix: str = "") -> Path:
    """The output of a video: its relative path under ``out_dir``, same container."""
    return out_dir / rel.parent / f"{rel.stem}{suffix}{rel.suffix}"


# ----------------------------------------------------------------------------- options

@dataclass(frozen=True)
class VideoOptions:
    """How video is encoded: ``codec`` (an FFmpeg encoder; None = libx264, VP9 for .webm),
    ``crf`` (None = :data:`DEFAULT_CRF` for encoders that have one), ``pix_fmt`` (None =
    the input's where the encoder takes it) and ``batch`` (frames per network call)."""
    codec: Optional[str] = None
    crf: Optional[int] = None
    pix_fmt: Optional[str] = None
    batch: int = 1


def _has_crf(codec: str) -> bool:
    av = require_av()
    private = av.CodecContext.create(codec, "w").supported_options.private
    return any(o.name == "crf" for o in private)


def _encoder(name: str):
    av = require_av()
    try:
        codec = av.Codec(name, "w")
    except (av.codec.codec.UnknownCodecError, ValueError):
        raise VideoError(f"--codec {name!r}: this FFmpeg has no such encoder (e.g. libx264, libx265, "
                         "libvpx-vp9, ffv1)") from None
    if codec.type != "video":
        raise VideoError(f"--codec {name!r} is a {codec.type} encoder, not a video one")
    return codec


def check_video_options(codec: Optional[str] = None, crf: Optional[int] = None,
                        pix_fmt: Optional[str] = None, batch: int = 1) -> VideoOptions:
    """The video options, checked before any clip is read (a :class:`VideoError` names the
    option at fault)."""
    if not isinstance(batch, int) or batch < 1:
        raise VideoError(f"--batch must be a positive number of frames, got {batch!r}")
    if codec is not None:
        enc = _encoder(codec)
        if crf is not None and not _has_crf(codec):
            raise VideoError(f"--crf: encoder {codec} has no crf setting"
                             + (" (it is lossless)" if codec in ("ffv1", "huffyuv", "utvideo") else ""))
        if pix_fmt is not None:
            names = [f.name for f in enc.video_formats or ()]
            if names and pix_fmt not in names:
                raise VideoError(f"--pix-fmt {pix_fmt}: encoder {codec} takes {', '.join(names)}")
    if crf is not None and not 0 <= crf <= 63:
        raise VideoError(f"--crf must be in 0..63, got {crf}")
    if pix_fmt is not None:
        av = require_av()
        try:
            av.VideoFormat(pix_fmt)
        except (ValueError, TypeError):
            raise VideoError(f"--pix-fmt {pix_fmt!r}: not a pixel format FFmpeg knows (e.g. yuv420p, "
                             "yuv444p, rgb24)") from None
    return VideoOptions(codec, crf, pix_fmt, batch)


# ----------------------------------------------------------------------------- pixel formats

def _bits(pix_fmt: str) -> int:
    av = require_av()
    return max(c.bits for c in av.VideoFormat(pix_fmt).components)


def _chroma_step(pix_fmt: str) -> Tuple[int, int]:
    """How many luma pixels share one chroma sample across and down (1, 1 for RGB / 4:4:4)."""
    av = require_av()
    fmt = av.VideoFormat(pix_fmt, 64, 64)
    comps = fmt.components
    if fmt.is_rgb or len(comps) < 3:
        return 1, 1
    return max(1, 64 // comps[1].width), max(1, 64 // comps[1].height)


def _choose_pix_fmt(codec, in_pix: str) -> str:
    """The input's pixel format where the encoder takes it, else the nearest it does."""
    av = require_av()
    supported = [f.name for f in codec.video_formats or ()]
    if not supported or in_pix in supported:
        return in_pix
    deep = _bits(in_pix) > 8
    rgb = av.VideoFormat(in_pix).is_rgb
    prefs: List[str] = []
    if rgb:
        prefs += (["gbrp10le", "rgb48le", "yuv444p10le"] if deep else []) + ["gbrp", "rgb24", "bgr0", "bgr24",
                                                                            "yuv444p"]
    elif deep:
        prefs += ["yuv420p10le"]
    prefs += ["yuv420p", "yuv444p", "bgr0", "rgb24"]
    return next((p for p in prefs if p in supported), supported[0])


# ----------------------------------------------------------------------------- reading

@dataclass
class VideoProbe:
    """What the first video stream says, and its first frame: size, pixel format, rates,
    frame count (0 when the container does not say), display matrix, colour tags."""
    width: int
    height: int
    pix_fmt: str
    codec: str
    time_base: Fraction
    rate: Optional[Fraction]
    frames: int
    duration: Optional[float]
    display_matrix: Optional[Tuple[int, ...]] = None
    sample_aspect_ratio: Optional[Fraction] = None
    colour: dict = field(default_factory=dict)  # color_range / colorspace / color_primaries / color_trc
    stream_duration: Optional[float] = None     # of the video stream, where the container says it


def _open_input(src: Path):
    av = require_av()
    if not src.is_file():
        raise VideoError(f"{src}: no such file")
    if src.stat().st_size == 0:
        raise VideoError(f"{src}: empty file (0 bytes), not a video")
    try:
        return av.open(str(src))
    except (av.FFmpegError, OSError, ValueError) as e:
        raise VideoError(f"{src}: cannot be read as a video ({_reason(e)})") from None


def _reason(e: Exception) -> str:
    text = getattr(e, "strerror", None) or str(e)
    return text.split(": '")[0] if isinstance(text, str) else str(e)


def _video_stream(src: Path, container):
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams})
        raise VideoError(f"{src}: has no video stream ({'only ' + ' and '.join(kinds) if kinds else 'no streams'})")
    vs = container.streams.video[0]
    cc = vs.codec_context
    name = getattr(cc, "name", None) if cc is not None else None
    if cc is None or not name or name == "none":
        tag = getattr(cc, "codec_tag", "") if cc is not None else ""
        raise VideoError(f"{src}: its video codec{(' ' + repr(tag)) if tag else ''} is unknown to FFmpeg; "
                         "it cannot be decoded")
    return vs


def _stated(tag: str, value: int) -> bool:
    """Whether a colour tag's value says something: range 1 (limited) or 2 (full); matrix,
    primaries and transfer other than 0 (RGB matrix / reserved), 2 (unspecified), 3 (reserved)."""
    return value in (1, 2) if tag == "color_range" else value not in (0, 2, 3)


def _clock_seconds(text: Optional[str]) -> Optional[float]:
    """``HH:MM:SS.fraction`` -> seconds (None when it is not that)."""
    try:
        h, m, sec = str(text).split(":")
        return int(h) * 3600 + int(m) * 60 + float(sec)
    except (ValueError, TypeError):
        return None


def probe_video(src: PathArg) -> VideoProbe:
    """Open ``src`` and decode its first frame: a :class:`VideoError` for a file that is not a
    readable video (empty, truncated before any frame, audio only, unknown codec)."""
    av = require_av()
    src = Path(src)
    with _open_input(src) as container:
        vs = _video_stream(src, container)
        try:
            first = next(container.decode(vs), None)
        except (av.FFmpegError, OSError, ValueError) as e:
            raise VideoError(f"{src}: its video cannot be decoded ({_reason(e)})") from None
        if first is None:
            raise VideoError(f"{src}: its video stream holds no frame that decodes (truncated or empty)")
        from av.sidedata.sidedata import Type
        matrix = first.side_data.get(Type.DISPLAYMATRIX)
        cc = vs.codec_context
        colour = {}
        for k in ("color_range", "colorspace", "color_primaries", "color_trc"):
            for where in (cc, first):  # the stream's tags, else the first frame's
                value = int(getattr(where, k, 0) or 0)
                if _stated(k, value):
                    colour[k] = value
                    break
        rate = vs.average_rate or vs.guessed_rate or vs.base_rate
        duration = float(vs.duration * vs.time_base) if vs.duration else (
            container.duration / 1e6 if container.duration else None)
        tag = vs.metadata.get("DURATION") or vs.metadata.get("duration")  # Matroska states it per stream
        stream_duration = float(vs.duration * vs.time_base) if vs.duration else _clock_seconds(tag)
        return VideoProbe(width=first.width, height=first.height, pix_fmt=first.format.name, codec=cc.name,
                          time_base=vs.time_base, rate=Fraction(rate) if rate else None, frames=vs.frames or 0,
                          duration=duration, stream_duration=stream_duration,
                          display_matrix=struct.unpack("<9i", bytes(matrix)) if matrix is not None else None,
                          sample_aspect_ratio=vs.sample_aspect_ratio or None, colour=colour)


# ----------------------------------------------------------------------------- frames

class _Frames:
    """Converts decoded frames to RGB arrays and upscaled arrays back to frames, with the
    input's colour matrix and range (the same both ways)."""

    def __init__(self, probe: VideoProbe, out_pix: str):
        self.deep = _bits(probe.pix_fmt) > 8 and _bits(out_pix) > 8
        self.work = "rgb48le" if self.deep else "rgb24"
        self.out_pix = out_pix
        self.colour = probe.colour

    def to_array(self, frame) -> np.ndarray:
        rng = self.colour.get("color_range")
        rgb = frame.reformat(format=self.work, src_color_range=rng) if rng else frame.reformat(format=self.work)
        return rgb.to_ndarray()

    def to_frame(self, array: np.ndarray, pts: Optional[int], time_base: Fraction):
        av = require_av()
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format=self.work)
        kwargs = {}
        if "colorspace" in self.colour:
            frame.colorspace = self.colour["colorspace"]
        if "color_range" in self.colour:
            kwargs["dst_color_range"] = self.colour["color_range"]
        out = frame.reformat(format=self.out_pix, **kwargs)
        for k, v in self.colour.items():
            setattr(out, k, v)
        out.pts = pts
        out.time_base = time_base
        return out


def _upscale_batch(upscaler: Upscaler, arrays: List[np.ndarray]) -> List[np.ndarray]:
    """Upscale frames of one size: together in one network call when there are several, no
    self-ensemble and they fit whole in memory, else one by one (the image path)."""
    dtype = arrays[0].dtype
    h, w = arrays[0].shape[:2]
    if len(arrays) == 1 or upscaler.self_ensemble or upscaler.plan(h * len(arrays), w) is not None:
        return [upscaler.upscale_array(a, dtype) for a in arrays]
    x = torch.from_numpy(np.stack([imgio.to_float(a) for a in arrays])).to(upscaler.device)
    with torch.inference_mode():
        y = upscaler.runner(x.permute(0, 3, 1, 2).contiguous())
        return [imgio.from_float(y[i].permute(1, 2, 0), dtype, inplace=True) for i in range(len(arrays))]


# ----------------------------------------------------------------------------- one clip

@dataclass
class VideoResult:
    """What :func:`upscale_video` wrote."""
    src: Path
    dst: Path
    frames: int
    width: int
    height: int
    codec: str
    pix_fmt: str
    copied_streams: int
    seconds: float

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else float("inf")


def _encoder_name(options: VideoOptions, muxer: str) -> str:
    return options.codec or DEFAULT_CODECS.get(muxer, DEFAULT_CODEC)


def _crf(options: VideoOptions, codec: str) -> Optional[int]:
    if options.crf is not None:
        return options.crf
    return DEFAULT_CRF if _has_crf(codec) else None


def _check_size(src: Path, width: int, height: int, pix_fmt: str, scale: int) -> None:
    sx, sy = _chroma_step(pix_fmt)
    if width % sx or height % sy:
        raise VideoError(f"{src}: the x{scale} output would be {width}x{height}, which {pix_fmt} cannot hold "
                         f"(its chroma has one sample per {sx}x{sy} pixels, so sides must be multiples of "
                         f"{sx} across and {sy} down); frames are not stretched: use a scale that gives an even "
                         "size (x2 always does), or --pix-fmt yuv444p, or --codec ffv1")


def upscale_video(src: PathArg, dst: PathArg, upscaler: Upscaler, options: Optional[VideoOptions] = None, *,
                  progress: Optional[bool] = None, log: Optional[Callable[[str], None]] = None) -> VideoResult:
    """Upscale the clip ``src`` into ``dst`` (written atomically: on any error nothing is left
    at ``dst``). The container is the one ``dst``'s extension names (``io.VIDEO_EXTENSIONS``).
    ``progress`` None shows a bar (frames, fps, ETA) on a terminal only."""
    av = require_av()
    src, dst = Path(src), Path(dst)
    options = options or VideoOptions()
    log = log or (lambda msg: print(msg, file=sys.stderr))
    muxer = imgio.VIDEO_EXTENSIONS.get(dst.suffix.lower())
    if muxer is None:
        raise VideoError(f"{dst}: unknown video container {dst.suffix!r}; use one of "
                         + ", ".join(sorted(imgio.VIDEO_EXTENSIONS)))
    probe = probe_video(src)
    scale = upscaler.scale
    width, height = probe.width * scale, probe.height * scale
    codec_name = _encoder_name(options, muxer)
    codec = _encoder(codec_name)
    out_pix = options.pix_fmt or _choose_pix_fmt(codec, probe.pix_fmt)
    _check_size(src, width, height, out_pix, scale)
    crf = _crf(options, codec_name)
    start = time.perf_counter()
    counts = {}

    def write(tmp: str) -> None:
        try:
            counts.update(_transcode(src, tmp, muxer, probe, upscaler, codec_name, out_pix, crf, options.batch,
                                     progress, log))
        except (av.FFmpegError, OSError) as e:
            raise VideoError(f"{src}: {_reason(e)} (writing {dst.name} with {codec_name} in {muxer})") from None

    imgio.atomic_write(dst, write)
    return VideoResult(src, dst, counts["frames"], width, height, codec_name, out_pix, counts["copied"],
                       time.perf_counter() - start)


def _keep_labels(src_stream, dst_stream) -> None:
    """A stream's language and title, and its disposition (default, forced, ...)."""
    for key in ("language", "title"):
        if src_stream.metadata.get(key):
            dst_stream.metadata[key] = src_stream.metadata[key]
    try:
        dst_stream.disposition = src_stream.disposition
    except (AttributeError, TypeError, ValueError):  # older PyAV: the muxer's own
        pass


def _add_video_stream(out, vin, probe: VideoProbe, codec: str, out_pix: str, crf: Optional[int], scale: int):
    """The output's video stream: the input's time base, rate, aspect, colour tags, display
    matrix and labels; the encoder's quality."""
    tb = vin.time_base
    vout = out.add_stream(codec, rate=probe.rate or Fraction(25))
    vout.width, vout.height, vout.pix_fmt = probe.width * scale, probe.height * scale, out_pix
    _keep_labels(vin, vout)
    vout.time_base = tb
    vout.codec_context.time_base = tb
    if probe.sample_aspect_ratio:
        vout.codec_context.sample_aspect_ratio = probe.sample_aspect_ratio
    for k, v in probe.colour.items():
        setattr(vout.codec_context, k, v)
    if crf is not None:
        vout.options = dict(vout.options or {}, crf=str(crf), **({"b": "0"} if codec == "libvpx-vp9" else {}))
    if probe.display_matrix is not None:
        vout.set_display_matrix(list(probe.display_matrix))
    return vout


def _transcode(src: Path, tmp: str, muxer: str, probe: VideoProbe, upscaler: Upscaler, codec: str,
               out_pix: str, crf: Optional[int], batch: int, progress: Optional[bool],
               log: Callable[[str], None]) -> dict:
    av = require_av()
    from tqdm import tqdm
    scale = upscaler.scale
    frames_io = _Frames(probe, out_pix)
    with _open_input(src) as inp, av.open(tmp, "w", format=muxer) as out:
        vin = _video_stream(src, inp)
        vin.thread_type = "AUTO"
        tb = vin.time_base
        copies, dropped, vout = {}, [], None
        for st in inp.streams:  # in the input's order
            if st.index == vin.index:
                vout = _add_video_stream(out, vin, probe, codec, out_pix, crf, scale)
            elif st.type in ("audio", "subtitle"):
                try:
                    copies[st.index] = out.add_stream_from_template(st)
                except (av.FFmpegError, ValueError) as e:
                    raise VideoError(f"{src}: its {st.type} stream #{st.index} cannot be copied ({e})") from None
                _keep_labels(st, copies[st.index])
            else:
                dropped.append(f"#{st.index} ({st.type})")
        if dropped:
            log(f"note: {src}: streams {', '.join(dropped)} are not carried over (audio and subtitles are)")
        out.metadata.update({k: v for k, v in inp.metadata.items() if k.lower() != "encoder"})

        total = probe.frames or (round(probe.duration * probe.rate) if probe.duration and probe.rate else None)
        bar = tqdm(total=total, desc=src.name[:30], unit="frame", file=sys.stderr,
                   disable=None if progress is None else not progress, leave=False)
        pending: List[Tuple[Optional[int], np.ndarray]] = []
        done = 0
        span = [None, None]  # first and last pts decoded

        def flush():
            nonlocal done
            if not pending:
                return
            ups = _upscale_batch(upscaler, [a for _, a in pending])
            for (pts, _), up in zip(pending, ups):
                for packet in vout.encode(frames_io.to_frame(up, pts, tb)):
                    out.mux(packet)
            done += len(pending)
            bar.update(len(pending))
            pending.clear()

        try:
            for packet in inp.demux([vin] + [inp.streams[i] for i in copies]):
                if packet.stream.index != vin.index:
                    if packet.size == 0 or (packet.dts is None and packet.pts is None):
                        continue
                    packet.stream = copies[packet.stream.index]
                    out.mux(packet)
                    continue
                try:
                    decoded = packet.decode()
                except (av.FFmpegError, ValueError) as e:
                    raise VideoError(f"{src}: frame {done + len(pending) + 1} cannot be decoded ({_reason(e)})") \
                        from None
                for frame in decoded:
                    if (frame.width, frame.height) != (probe.width, probe.height):
                        raise VideoError(f"{src}: the frame size changes from {probe.width}x{probe.height} to "
                                         f"{frame.width}x{frame.height} mid-stream, which is not supported")
                    if frame.pts is not None:
                        span[0] = frame.pts if span[0] is None else min(span[0], frame.pts)
                        span[1] = frame.pts if span[1] is None else max(span[1], frame.pts)
                    pending.append((frame.pts, frames_io.to_array(frame)))
                    if len(pending) >= batch:
                        flush()
            flush()
            for packet in vout.encode():
                out.mux(packet)
        finally:
            bar.close()
        if probe.frames and done < probe.frames:
            raise VideoError(f"{src}: truncated: {done} of the {probe.frames} frames its container lists decode")
        _check_span(src, span, tb, probe)
    return {"frames": done, "copied": len(copies)}


def _check_span(src: Path, span: list, tb: Fraction, probe: VideoProbe) -> None:
    """A clip whose decoded frames end well before the duration its container states is
    truncated (two frame intervals of slack, for the last frame's own length)."""
    if probe.stream_duration is None or span[0] is None:
        return
    step = float(1 / probe.rate) if probe.rate else 0.1
    end = float((span[1] - span[0]) * tb)
    if end + 2 * step + 0.05 < probe.stream_duration:
        raise VideoError(f"{src}: truncated: its frames end at {end:.3f} s, but its container says the video "
                         f"lasts {probe.stream_duration:.3f} s")


# ----------------------------------------------------------------------------- many clips

def upscale_videos(items: List[Tuple[Path, Path]], out_dir: PathArg, upscaler: Upscaler, report,
                   options: Optional[VideoOptions] = None, *, suffix: str = "", overwrite: bool = False,
                   progress: Optional[bool] = None, log: Optional[Callable[[str], None]] = None) -> None:
    """Upscale ``(file, relative path)`` clips into ``out_dir`` keeping relative paths, adding
    to ``report`` (an ``engine.batch.BatchReport``): outputs are recorded in the folder's
    record and skipped on a rerun by the rules of images (``engine.batch``); a clip that fails
    is reported and the others go on."""
    from .backends import runner_identity
    from .batch import _decide, _Job
    from .records import OutputRecord
    out_dir = Path(out_dir)
    options = options or VideoOptions()
    log = log or (lambda msg: print(msg, file=sys.stderr))
    record = OutputRecord(out_dir, log)
    label, ident = runner_identity(upscaler.runner)
    try:
        for src, rel in items:
            dst = video_output_path(rel, out_dir, suffix)
            muxer = imgio.VIDEO_EXTENSIONS.get(dst.suffix.lower(), "")
            codec = _encoder_name(options, muxer)
            if dst.resolve() == src.resolve():
                msg = f"output {dst} would replace its own input (use another output folder or --suffix)"
                report.failed.append((str(src), msg))
                log(f"error: {msg}")
                continue
            settings = {"scale": upscaler.scale, "model": label, "model_id": ident,
                        "self_ensemble": upscaler.self_ensemble,
                        "quality": f"{codec} crf {_crf(options, codec)} {options.pix_fmt or 'auto'}"}
            action, kind, why = _decide(_Job(src, rel, dst, "video"), settings, record, overwrite)
            if action == "skip":
                report.skipped.append((src, dst))
                report.skip_reasons[dst] = why
                report._skip_kinds[kind] += 1
                log(f"skip: {dst}: {why}")
                continue
            if why:
                report.redone[dst] = why
                log(f"redo: {dst}: {why}")
            try:
                result = upscale_video(src, dst, upscaler, options, progress=progress, log=log)
            except VideoError as e:
                report.failed.append((str(src), str(e)))
                log(f"error: {e}")
                continue
            except Exception as e:  # out of memory, a model error ...: report, go on
                oom = isinstance(e, (torch.cuda.OutOfMemoryError, MemoryError))
                hint = "; try a smaller --tile or --batch" if oom else ""
                report.failed.append((str(src), f"{type(e).__name__}: {e}{hint}"))
                log(f"error: {src}: {type(e).__name__}: {e}{hint}")
                continue
            report.done.append((src, dst))
            log(f"video: {dst}: {result.frames} frames {result.width}x{result.height} {result.codec} "
                f"{result.pix_fmt}, {result.fps:.2f} fps")
            record.add(dst, src, settings)
            record.save(force=False)
    finally:
        record.save()
