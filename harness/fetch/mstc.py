"""ShanghaiTech Campus -> mSTC: sampled video frames in the MVTec layout."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from harness.errors import FetchError
from harness.fetch.layout import count_images, find_dir, subfolders, write_mask

MSTC_PROTOCOLS = ("per_scene", "all_scenes")


def _mstc_class(video_id: str, protocol: str) -> str:
    # Video ids are <scene>_<number>: "01_001" (training) or "01_0014" (test) -> scene_01.
    return f"scene_{video_id.split('_')[0]}" if protocol == "per_scene" else "all_scenes"


def _numeric_order(path: Path) -> tuple:
    return (0, int(path.stem), "") if path.stem.isdigit() else (1, 0, path.stem)


def convert_mstc(
    raw_root: str | os.PathLike, out_root: str | os.PathLike, every: int = 5,
    protocol: str = "per_scene", classes: Sequence[str] | None = None, jpeg_quality: int = 95,
    progress: bool = False,
) -> dict:
    """ShanghaiTech Campus -> mSTC in the MVTec layout.

    Every ``every``-th frame of each training video (decoded with PyAV, saved as JPEG) goes to
    train/good, and every ``every``-th test frame (JPEG bytes copied) to test/good or, when its
    pixel mask has any anomalous pixel, to test/anomaly with a 0/255 mask. ``protocol``
    "per_scene" makes one class per scene (scene_01, ...); "all_scenes" one class for all.
    Classes left without training or test frames are dropped and listed in the result.
    """
    import av  # imported here: only mSTC needs a video decoder

    if protocol not in MSTC_PROTOCOLS:
        raise FetchError(f"mSTC protocol {protocol!r} is not one of {', '.join(MSTC_PROTOCOLS)}")
    if every < 1:
        raise FetchError(f"mSTC frame step must be >= 1, got {every}")
    raw_root, out_root = Path(raw_root), Path(out_root)
    root = find_dir(raw_root, lambda d: (d / "training").is_dir() and (d / "testing").is_dir())
    if root is None:
        raise FetchError(f"no training/ and testing/ folders under {raw_root}: not ShanghaiTech?")
    wanted = set(classes) if classes is not None else None

    videos = sorted((root / "training" / "videos").glob("*.avi"))
    if not videos:
        raise FetchError(f"no training videos in {root / 'training' / 'videos'}")
    for video in tqdm(videos, desc="mSTC training videos", disable=not progress, file=sys.stderr):
        cls = _mstc_class(video.stem, protocol)
        if wanted is not None and cls not in wanted:
            continue
        out = out_root / cls / "train" / "good"
        out.mkdir(parents=True, exist_ok=True)
        try:
            with av.open(str(video)) as container:
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"
                for index, frame in enumerate(container.decode(stream)):
                    if index % every == 0:
                        frame.to_image().save(out / f"{video.stem}_{index:04d}.jpg",
                                              quality=jpeg_quality)
        except av.error.FFmpegError as exc:
            raise FetchError(f"cannot decode {video}: {exc}") from exc

    frames_root = root / "testing" / "frames"
    test_videos = sorted(subfolders(frames_root))
    if not test_videos:
        raise FetchError(f"no test frame folders in {frames_root}")
    label_disagreements = 0
    for video in tqdm(test_videos, desc="mSTC test videos", disable=not progress, file=sys.stderr):
        cls = _mstc_class(video.name, protocol)
        if wanted is not None and cls not in wanted:
            continue
        frames = sorted(video.glob("*.jpg"), key=_numeric_order)
        pixel_path = root / "testing" / "test_pixel_mask" / f"{video.name}.npy"
        label_path = root / "testing" / "test_frame_mask" / f"{video.name}.npy"
        if not pixel_path.is_file():
            raise FetchError(f"{video} has no pixel mask {pixel_path}")
        try:
            pixel_masks = np.load(pixel_path, mmap_mode="r")  # [frames, H, W]; read frame by frame
            labels = np.load(label_path) if label_path.is_file() else None
        except (OSError, ValueError) as exc:
            raise FetchError(f"cannot read the masks of {video.name}: {exc}") from exc
        if pixel_masks.ndim != 3 or len(pixel_masks) != len(frames):
            raise FetchError(f"{pixel_path} has shape {pixel_masks.shape}, expected "
                             f"[{len(frames)} frames, H, W] to match {video}")
        for index in range(0, len(frames), every):
            frame = frames[index]
            mask = np.asarray(pixel_masks[index]) > 0
            with Image.open(frame) as im:
                width, height = im.size
            if mask.shape != (height, width):
                raise FetchError(f"{pixel_path}[{index}] is {mask.shape[1]}x{mask.shape[0]} but "
                                 f"{frame} is {width}x{height}")
            anomalous = bool(mask.any())
            if labels is not None and bool(labels[index]) != anomalous:
                label_disagreements += 1  # pixel masks decide, as the pixel metric does
            stem = f"{video.name}_{index:04d}"
            defect = "anomaly" if anomalous else "good"
            (out_root / cls / "test" / defect).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(frame, out_root / cls / "test" / defect / f"{stem}{frame.suffix}")
            if anomalous:
                gt = out_root / cls / "ground_truth" / "anomaly"
                gt.mkdir(parents=True, exist_ok=True)
                write_mask(mask, gt / f"{stem}_mask.png")

    dropped = {}
    for cls_dir in sorted(d for d in out_root.iterdir() if d.is_dir()):
        has_train = count_images(cls_dir / "train" / "good") > 0
        has_test = (cls_dir / "test").is_dir()
        if not (has_train and has_test):
            dropped[cls_dir.name] = "no test frames" if has_train else "no training frames"
            shutil.rmtree(cls_dir)
    return {"dropped_classes": dropped, "frame_label_disagreements": label_disagreements}
