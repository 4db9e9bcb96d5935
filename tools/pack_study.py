"""Pack a study's sweep folder into one file for the repository: DIR -> DIR.tar.xz, the same
bytes for the same logs (members sorted, no times or owners), checkpoints and figures left out
(each run's figures are drawn again from its logs: `python -m plots RUN_DIR`).

    python tools/pack_study.py results/gpt-tune     # writes results/gpt-tune.tar.xz

`python sweep.py ... --pack=results/gpt-tune.tar.xz` unpacks it into its sweep folder, redraws
the study's tables and figures and runs whatever the pack lacks (docs/studies.md).
"""
import io
import os
import sys
import tarfile

LEFT_OUT = ("ckpt.pt", "ckpt.pt.tmp")


def pack(folder):
    folder = folder.rstrip("/")
    files = []
    for parent, dirs, names in os.walk(folder):
        dirs.sort()
        files += [os.path.join(parent, n) for n in sorted(names)
                  if n not in LEFT_OUT and not n.endswith(".png")]
    out = folder + ".tar.xz"
    with tarfile.open(out, "w:xz", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(files):
            with open(path, "rb") as f:
                data = f.read()
            info = tarfile.TarInfo(os.path.relpath(path, folder))
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    return out, len(files)


def main(argv):
    if len(argv) != 1 or not os.path.isdir(argv[0]):
        print("error: give one sweep folder, e.g. python tools/pack_study.py results/gpt-tune",
              file=sys.stderr)
        return 2
    out, n = pack(argv[0])
    print(f"wrote {out}: {n} files, {os.path.getsize(out) / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
