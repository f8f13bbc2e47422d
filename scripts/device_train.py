#!/usr/bin/env python3
"""Continue a training run for a few minutes on a GPU machine that has JAX but neither Keras nor TensorFlow.

Three steps, each one command:

    python scripts/device_train.py pack --run runs/NAME --data ../shared/data/ham10000-200x150
        here: writes .device/ (git-ignored): the run's training and validation images at training
        resolution as JPEGs in one file (at most 40 MiB), the pure-Python Keras wheels, and the
        run's carry-over weights in parts under 16 MiB
    python3 scripts/device_train.py train --run runs/NAME --minutes 9
        there (the device tool carries .device/): installs the wheels, unpacks the images, resumes
        the run under KERAS_BACKEND=jax for at most --minutes, and writes the new carry-over, in
        parts under 16 MiB, and the run's history to $OUT
    python scripts/device_train.py unpack --run runs/NAME --from DIR
        here: joins the parts into the run's resume/ folder and takes the history and state, so
        that `python -m ml.train --out runs/NAME --resume` (or --snapshot) goes on from there

The device machine is a bonus, never the plan: CPU training resumes from the same carry-over.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PACK = ROOT / ".device"
DATA_FILE = "images.npz"
PART_BYTES = 15 * 1024 * 1024  # the device returns files of at most 16 MiB
MAX_DATA_BYTES = 40 * 1024 * 1024
JPEG_QUALITY = 90
# Keras 3 and what it needs beyond the device's own packages (numpy, h5py, ml-dtypes, rich, absl-py are there).
WHEELS = ("keras==3.15.1", "namex==0.1.0", "optree==0.20.0")
DEVICE_PYTHON = "3.12"
CARRIED = ("model.weights.h5", "best.weights.h5")


def split_file(path: Path, out_dir: Path) -> list[Path]:
    """`path` cut into parts of at most PART_BYTES named NAME.partNN; returns them in order."""
    data, parts = path.read_bytes(), []
    for i in range(0, max(len(data), 1), PART_BYTES):
        part = out_dir / f"{path.name}.part{i // PART_BYTES:02d}"
        part.write_bytes(data[i : i + PART_BYTES])
        parts.append(part)
    return parts


def join_parts(parts_dir: Path, name: str, target: Path) -> Path:
    """The inverse of `split_file`: NAME.part00, part01, ... joined into `target`."""
    parts = sorted(parts_dir.glob(f"{name}.part*"))
    if not parts:
        raise FileNotFoundError(f"No parts of {name} in {parts_dir}.")
    tmp = target.with_name(target.name + ".tmp")
    with tmp.open("wb") as out:
        for part in parts:
            out.write(part.read_bytes())
    os.replace(tmp, target)
    return target


def pack_images(run: Path, data: str, out: Path) -> dict:
    """The run's train and val images, at the sizes training reads them, as JPEG bytes in one npz."""
    import cv2

    from ml import augment as A
    from ml import data as D

    args = json.loads((run / "args.json").read_text())
    size = tuple(args["img_size"])
    table = D.apply_split(D.read_dataset(data), run / "split.csv")
    table = table[table["split"].isin(["train", "val"])].reset_index(drop=True)
    chunks, offsets = [], [0]
    for path, part in zip(table["path"], table["split"]):
        target = A.source_size(size) if part == "train" else size
        image = D.resize_image(D.decode_image_file(path), target)
        ok, encoded = cv2.imencode(
            ".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]
        )
        if not ok:
            raise ValueError(f"Could not encode {path} as JPEG.")
        chunks.append(encoded.ravel())
        offsets.append(offsets[-1] + encoded.size)
    np.savez(
        out / DATA_FILE,
        jpeg=np.concatenate(chunks),
        offsets=np.asarray(offsets, np.int64),
        image_id=table["image_id"].to_numpy(str),
        lesion_id=table["lesion_id"].to_numpy(str),
        dx=table["dx"].to_numpy(str),
    )
    size_bytes = (out / DATA_FILE).stat().st_size
    if size_bytes > MAX_DATA_BYTES:
        raise ValueError(f"The image pack is {size_bytes / 2**20:.1f} MiB, over {MAX_DATA_BYTES / 2**20:.0f} MiB.")
    return {"images": len(table), "mib": round(size_bytes / 2**20, 1)}


def unpack_images(pack: Path, folder: Path) -> Path:
    """A HAM10000-layout folder (metadata CSV + images/) from the npz written by `pack_images`."""
    with np.load(pack) as f:
        jpeg, offsets = f["jpeg"], f["offsets"]
        rows = list(zip(f["image_id"], f["lesion_id"], f["dx"]))
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = ["lesion_id,image_id,dx"]
    for i, (image_id, lesion_id, dx) in enumerate(rows):
        (folder / "images" / f"{image_id}.jpg").write_bytes(jpeg[offsets[i] : offsets[i + 1]].tobytes())
        lines.append(f"{lesion_id},{image_id},{dx}")
    (folder / "HAM10000_metadata.csv").write_text("\n".join(lines) + "\n")
    return folder


def pack(args: argparse.Namespace) -> None:
    run = Path(args.run)
    if PACK.exists():
        shutil.rmtree(PACK)
    (PACK / "wheels").mkdir(parents=True)
    (PACK / "weights").mkdir()
    print(json.dumps(pack_images(run, args.data, PACK)))
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", DEVICE_PYTHON,
         "--implementation", "cp", "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
         "--platform", "manylinux2014_x86_64", "-d", str(PACK / "wheels"), *WHEELS],
        check=True,
    )  # fmt: skip
    for name in CARRIED:
        if (run / "resume" / name).is_file():
            split_file(run / "resume" / name, PACK / "weights")
    print(f"Packed {sum(p.stat().st_size for p in PACK.rglob('*') if p.is_file()) / 2**20:.1f} MiB into {PACK}")


def train_on_device(args: argparse.Namespace) -> None:
    """Runs there: wheels, images and weights from .device/, results into $OUT."""
    run, out = Path(args.run), Path(os.environ.get("OUT", "/tmp/out"))
    site = Path("/tmp/site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(site),
         *map(str, sorted((PACK / "wheels").glob("*.whl")))],
        check=True,
    )  # fmt: skip
    data = unpack_images(PACK / DATA_FILE, Path("/tmp/ham"))
    (run / "resume").mkdir(exist_ok=True)
    for name in CARRIED:
        if list((PACK / "weights").glob(f"{name}.part*")):
            join_parts(PACK / "weights", name, run / "resume" / name)
    env = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": f"{site}{os.pathsep}{ROOT}"}
    command = [sys.executable, "-m", "ml.train", "--out", str(run), "--resume", "--data", str(data),
               "--max-minutes", str(args.minutes), "--verbose", "2"]  # fmt: skip
    started = time.time()
    subprocess.run(command, cwd=ROOT, env=env, check=True)
    subprocess.run(
        [sys.executable, "-m", "ml.train", "--out", str(run), "--pack-resume"], cwd=ROOT, env=env, check=True
    )
    out.mkdir(parents=True, exist_ok=True)
    for name in CARRIED:
        if (run / "resume" / name).is_file():
            split_file(run / "resume" / name, out)
    for name in ("history.csv", "train.log"):
        shutil.copyfile(run / name, out / name)
    shutil.copyfile(run / "resume" / "state.json", out / "state.json")
    print(f"Trained for {(time.time() - started) / 60:.1f} minutes; results in {out}")


def unpack(args: argparse.Namespace) -> None:
    run, source = Path(args.run), Path(getattr(args, "from"))
    for name in CARRIED:
        if list(source.glob(f"{name}.part*")):
            join_parts(source, name, run / "resume" / name)
    shutil.copyfile(source / "state.json", run / "resume" / "state.json")
    shutil.copyfile(source / "history.csv", run / "history.csv")
    with (run / "train.log").open("a") as log:
        log.write((source / "train.log").read_text())
    print(f"{run}/resume/ now holds the device's carry-over; resume with python -m ml.train --out {run} --resume")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="scripts/device_train.py", description=__doc__.split("\n")[0])
    steps = parser.add_subparsers(dest="step", required=True)
    p = steps.add_parser("pack", help="here: images, wheels and weights into .device/")
    p.add_argument("--run", required=True)
    p.add_argument("--data", required=True)
    p.set_defaults(func=pack)
    t = steps.add_parser("train", help="there: resume the run under JAX for at most --minutes")
    t.add_argument("--run", required=True)
    t.add_argument("--minutes", type=float, default=9.0)
    t.set_defaults(func=train_on_device)
    u = steps.add_parser("unpack", help="here: the device's results into the run's resume/")
    u.add_argument("--run", required=True)
    u.add_argument("--from", required=True, help="the folder the device's files were fetched to")
    u.set_defaults(func=unpack)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
