"""Video through ``distillsr upscale`` (engine.video): clips made here with PyAV; the output
keeps frame count, timestamps (variable frame rate too), duration, rotation, colour tags and
the audio packets, and its frames equal the image path on a lossless codec."""
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

av = pytest.importorskip("av", reason="needs PyAV (pip install distillsr[video])")

from conftest import REPO  # noqa: E402
from distillsr.cli.main import main  # noqa: E402
from distillsr.engine.backends import load_runner  # noqa: E402
from distillsr.engine.inputs import collect_inputs  # noqa: E402
from distillsr.engine.shard import upscale_collection  # noqa: E402
from distillsr.engine.upscaler import Upscaler  # noqa: E402
from distillsr.engine.video import (VideoError, VideoOptions, check_video_options, probe_video,  # noqa: E402
                                    require_av, upscale_video)
from distillsr.io import INPUT_EXTENSIONS, VIDEO_EXTENSIONS, read_image, write_image  # noqa: E402

VFR_STEPS = (33, 50, 17)  # ms between frames of the variable-frame-rate clip


def make_clip(path, width, height, *, frames=30, codec="libx264", pix_fmt="yuv420p", vfr=False, audio=True,
              rotation=None, colour=None, subtitles=False, seed=0):
    """A clip of smooth random frames (so that bicubic and the codec see real structure),
    with an AAC track of 48 kHz mono when ``audio``, and two SubRip cues when ``subtitles``."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (height // 4 + 2, width // 4 + 2, 3)).astype(np.float32)
    with av.open(str(path), "w") as c:
        vs = c.add_stream(codec, rate=30)
        vs.width, vs.height, vs.pix_fmt = width, height, pix_fmt
        if vfr:
            vs.codec_context.time_base = Fraction(1, 1000)
        if rotation is not None:
            vs.set_display_rotation(rotation)
        for k, v in (colour or {}).items():
            setattr(vs.codec_context, k, v)
        a = c.add_stream("aac", rate=48000) if audio else None
        if a is not None:
            a.layout = "mono"
        subs = c.add_mux_stream("subrip") if subtitles else None
        if subs is not None:
            subs.time_base = Fraction(1, 1000)
        pts = 0
        for i in range(frames):
            small = np.roll(base, i, axis=1)
            img = np.kron(small, np.ones((4, 4, 1)))[:height, :width]
            img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            if vfr:
                frame.pts, frame.time_base = pts, Fraction(1, 1000)
                pts += VFR_STEPS[i % len(VFR_STEPS)]
            for p in vs.encode(frame):
                c.mux(p)
        for p in vs.encode():
            c.mux(p)
        for k, text in enumerate([b"first cue", b"second cue"] if subs is not None else []):
            p = av.Packet(text)
            p.stream, p.time_base, p.pts, p.dts, p.duration = subs, Fraction(1, 1000), 200 * k, 200 * k, 150
            c.mux(p)
        if a is not None:
            for k in range(frames * 48000 // 30 // 1024 + 1):
                t = (np.arange(1024) + k * 1024) / 48000
                samples = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]
                af = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
                af.sample_rate, af.pts = 48000, k * 1024
                for p in a.encode(af):
                    c.mux(p)
            for p in a.encode():
                c.mux(p)
    return Path(path)


def frames_of(path, fmt="rgb24"):
    with av.open(str(path)) as c:
        return [(f.pts * f.time_base, f.to_ndarray(format=fmt), f) for f in c.decode(video=0)]


def timestamps(path):
    with av.open(str(path)) as c:
        return [f.pts * f.time_base for f in c.decode(video=0)]


def audio_packets(path, kind="audio"):
    with av.open(str(path)) as c:
        return [(bytes(p), p.pts * p.time_base) for p in c.demux(**{kind: 0}) if p.size]


def container_facts(path):
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        return {"duration": c.duration, "rate": v.average_rate, "codec": v.codec_context.name,
                "pix_fmt": v.codec_context.pix_fmt, "size": (v.codec_context.width, v.codec_context.height),
                "audio": [s.codec_context.name for s in c.streams.audio]}


def no_partial_files(folder):
    return [p.name for p in Path(folder).rglob("*") if p.name.endswith(".part")] == []


@pytest.fixture(scope="module")
def bicubic2():
    return Upscaler(load_runner("bicubic", 2, device="cpu"), "cpu", tile=0)


def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    return subprocess.run([sys.executable, "-m", "distillsr", "upscale", *map(str, args), "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=300)


def test_extension_table_is_one_table_and_folders_mix_images_and_videos(tmp_path):
    assert not set(VIDEO_EXTENSIONS) & INPUT_EXTENSIONS
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "b.mp4").write_bytes(b"x")
    (tmp_path / "c.txt").write_bytes(b"x")
    images, _ = collect_inputs([tmp_path])
    assert [p.name for p, _ in images] == ["a.png"]  # images only, by default (eval, degrade, training)
    both, _ = collect_inputs([tmp_path], extensions=INPUT_EXTENSIONS | set(VIDEO_EXTENSIONS))
    assert [p.name for p, _ in both] == ["a.png", "b.mp4"]


def test_done_when_x2_clip_keeps_rate_timestamps_audio_rotation_colour(tmp_path):
    colour = {"colorspace": 1, "color_primaries": 1, "color_trc": 1, "color_range": 1}  # BT.709, limited
    clip = make_clip(tmp_path / "clip.mp4", 64, 48, rotation=90, colour=colour)
    r = run_cli(clip, "-o", tmp_path / "out", "--scale", "2", "--model", "bicubic", "--tile", "0")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out" / "clip.mp4"
    src_facts, out_facts = container_facts(clip), container_facts(out)
    assert out_facts["size"] == (128, 96)
    assert out_facts["rate"] == src_facts["rate"] == 30
    assert out_facts["duration"] == src_facts["duration"]
    assert out_facts["codec"] == "h264" and out_facts["pix_fmt"] == "yuv420p"
    frames = frames_of(out)
    assert len(frames) == 30 and all(f.shape == (96, 128, 3) for _, f, _ in frames)
    assert [t for t, _, _ in frames] == timestamps(clip)
    assert frames[0][2].rotation == 90
    with av.open(str(out)) as c:
        cc = c.streams.video[0].codec_context
        assert (int(cc.colorspace), int(cc.color_primaries), int(cc.color_trc), int(cc.color_range)) == (1, 1, 1, 1)
    src_audio, out_audio = audio_packets(clip), audio_packets(out)
    assert len(src_audio) > 40 and out_audio == src_audio   # bit-identical packets, same timing
    assert no_partial_files(tmp_path / "out")
    # the pixels follow the input: a frame's upscale is near the decoded output in luma (h264
    # at crf 18; 4:2:0 drops the fine chroma of the random clip, so colour is not compared)
    src0 = frames_of(clip)[0][1]
    up = Upscaler(load_runner("bicubic", 2, device="cpu"), "cpu", tile=0).upscale_array(src0, np.uint8)
    luma = np.array([0.2126, 0.7152, 0.0722])
    assert np.abs(up @ luma - frames[0][1] @ luma).mean() < 3


@pytest.mark.parametrize("vfr", [False, True], ids=["cfr", "vfr"])
def test_odd_size_lossless_frames_equal_the_image_path(tmp_path, bicubic2, vfr):
    clip = make_clip(tmp_path / "odd.mkv", 65, 49, codec="ffv1", pix_fmt="bgr0", vfr=vfr, subtitles=True)
    out = tmp_path / "out" / "odd.mkv"
    result = upscale_video(clip, out, bicubic2, check_video_options(codec="ffv1"), progress=False)
    assert (result.frames, result.width, result.height, result.pix_fmt) == (30, 130, 98, "bgr0")
    src, got = frames_of(clip), frames_of(out)
    assert len(got) == len(src) == 30
    assert [t for t, _, _ in got] == [t for t, _, _ in src]
    if vfr:
        steps = {float(b - a) for (a, _, _), (b, _, _) in zip(src, src[1:])}
        assert steps == {s / 1000 for s in VFR_STEPS}   # the clip really is variable
    assert container_facts(out)["duration"] == container_facts(clip)["duration"]
    assert audio_packets(out) == audio_packets(clip)
    subs = audio_packets(clip, "subtitles")
    assert [b for b, _ in subs] == [b"first cue", b"second cue"] and audio_packets(out, "subtitles") == subs
    for i in range(30) if not vfr else (0, 14, 29):  # every frame once; the VFR clip checks its timing
        assert np.array_equal(bicubic2.upscale_array(src[i][1], np.uint8), got[i][1]), f"frame {i}"
    # and through the image files themselves, for two frames
    for i in (0, 29) if not vfr else ():
        write_image(tmp_path / f"f{i}.png", src[i][1])
        bicubic2.upscale_file(tmp_path / f"f{i}.png", tmp_path / f"f{i}_x2.png")
        assert np.array_equal(read_image(tmp_path / f"f{i}_x2.png")[0], got[i][1].astype(np.float32) / 255)


def test_batches_of_frames_keep_count_and_timestamps(tmp_path, bicubic2):
    clip = make_clip(tmp_path / "v.mkv", 32, 24, codec="ffv1", pix_fmt="bgr0", vfr=True, frames=10, audio=False)
    out = tmp_path / "out.mkv"
    upscale_video(clip, out, bicubic2, check_video_options(codec="ffv1", batch=4), progress=False)
    src, got = frames_of(clip), frames_of(out)
    assert [t for t, _, _ in got] == [t for t, _, _ in src]
    for (_, lr, _), (_, sr, _) in zip(src, got):  # one network call for 4 frames: float rounding at most
        assert np.abs(bicubic2.upscale_array(lr, np.uint8).astype(int) - sr.astype(int)).max() <= 1


def test_odd_output_in_420_is_refused_and_444_holds_it(tmp_path):
    clip = make_clip(tmp_path / "odd420.mkv", 65, 49, codec="ffv1", pix_fmt="yuv420p", frames=3, audio=False)
    up3 = Upscaler(load_runner("bicubic", 3, device="cpu"), "cpu", tile=0)
    out = tmp_path / "out" / "odd420.mkv"
    with pytest.raises(VideoError, match=r"195x147.*yuv420p.*not stretched"):
        upscale_video(clip, out, up3, VideoOptions(codec="libx264"), progress=False)
    assert not out.exists() and no_partial_files(tmp_path)
    res = upscale_video(clip, out, up3, check_video_options(codec="libx264", pix_fmt="yuv444p"), progress=False)
    assert (res.frames, res.width, res.height) == (3, 195, 147)
    assert container_facts(out)["pix_fmt"] == "yuv444p"


def test_bad_inputs_are_clear_errors_and_leave_nothing(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    good = make_clip(src / "good.mkv", 32, 24, codec="ffv1", pix_fmt="bgr0", frames=20)
    data = good.read_bytes()
    (src / "truncated.mkv").write_bytes(data[: len(data) // 2])
    (src / "empty.mp4").write_bytes(b"")
    with av.open(str(src / "audio_only.mp4"), "w") as c:  # audio and nothing else
        a = c.add_stream("aac", rate=48000)
        a.layout = "mono"
        af = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        af.sample_rate, af.pts = 48000, 0
        for p in list(a.encode(af)) + list(a.encode()):
            c.mux(p)
    h264 = make_clip(tmp_path / "h264.mp4", 32, 24, frames=3, audio=False).read_bytes()
    (src / "unknown_codec.mp4").write_bytes(h264.replace(b"avc1", b"zzzz"))  # a codec tag nobody knows
    r = run_cli(src, "-o", tmp_path / "out", "--scale", "2", "--model", "bicubic", "--tile", "0", "--codec", "ffv1")
    assert r.returncode == 1
    err = r.stderr
    assert "truncated.mkv: truncated" in err
    assert "empty.mp4: empty file" in err
    assert "audio_only.mp4: has no video stream (only audio)" in err
    assert "unknown_codec.mp4: its video codec" in err and "unknown" in err
    assert "4 failed" in r.stdout and "1 upscaled" in r.stdout
    made = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert made == [".distillsr-upscale.json", "good.mkv"]  # no partial or temporary file
    assert len(frames_of(tmp_path / "out" / "good.mkv")) == 20


def test_without_pyav_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # import av then fails
    with pytest.raises(VideoError, match=r"pip install distillsr\[video\]"):
        require_av()


def test_video_options_are_checked_before_any_work(tmp_path, capsys):
    with pytest.raises(VideoError, match="no such encoder"):
        check_video_options(codec="nosuch")
    with pytest.raises(VideoError, match="ffv1 has no crf"):
        check_video_options(codec="ffv1", crf=10)
    with pytest.raises(VideoError, match="--pix-fmt rgb24: encoder libx264 takes"):
        check_video_options(codec="libx264", pix_fmt="rgb24")
    with pytest.raises(VideoError, match="--batch"):
        check_video_options(batch=0)
    assert main(["upscale", str(tmp_path), "-o", str(tmp_path / "o"), "--codec", "nosuch", "--model", "bicubic"]) == 2
    assert "no such encoder" in capsys.readouterr().err
    with pytest.raises(VideoError, match="no video stream|cannot be read"):
        probe_video(Path(__file__))


def test_rerun_skips_finished_videos_and_images(tmp_path, bicubic2):
    src = tmp_path / "in"
    src.mkdir()
    make_clip(src / "c.mkv", 32, 24, codec="ffv1", pix_fmt="bgr0", frames=4, audio=False)
    write_image(src / "i.png", np.zeros((8, 8, 3), np.uint8))
    opts = check_video_options(codec="ffv1")
    first = upscale_collection([src], tmp_path / "out", bicubic2, video=opts, progress=False, log=lambda m: None)
    assert first.ok and len(first.done) == 2
    mtime = (tmp_path / "out" / "c.mkv").stat().st_mtime_ns
    again = upscale_collection([src], tmp_path / "out", bicubic2, video=opts, progress=False, log=lambda m: None)
    assert (len(again.done), len(again.skipped)) == (0, 2)
    assert (tmp_path / "out" / "c.mkv").stat().st_mtime_ns == mtime
    other = upscale_collection([src], tmp_path / "out", bicubic2, video=check_video_options(codec="libx264"),
                               progress=False, log=lambda m: None)
    assert [d.name for _, d in other.done] == ["c.mkv"]  # another codec: made again
